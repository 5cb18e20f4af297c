"""In-memory Lago organization: customers, plans, subscriptions, events, usage and invoices.

Every public method of :class:`LagoStore` takes the store lock itself (a re-entrant lock, never held
across an ``await``), validates its whole input first and only then writes, so a refused call leaves
the state untouched. Methods return serialized objects shaped like Lago's API answers and raise
:class:`~._util.ApiError` carrying Lago's exact error body.
"""

from __future__ import annotations

import copy
import functools
import heapq
import json
import math
import random
import re
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta, tzinfo
from decimal import ROUND_CEILING, ROUND_DOWN, ROUND_FLOOR, ROUND_HALF_UP, Context, Decimal, localcontext
from typing import Any, NamedTuple, ParamSpec, TypeVar

from .._dashboard import subunits_per_unit
from .._errors import ConfigurationError
from ._accepted import CURRENCIES, TIMEZONES
from ._util import (
    JSON,
    UTC,
    YEARLY_FACTOR,
    bad_request,
    billing_period,
    cents,
    decimal_str,
    drop_none,
    iso,
    iso_ms,
    local_day_start,
    not_allowed,
    not_found,
    paginate,
    paginate_limited,
    parse_datetime,
    to_decimal,
    validation_error,
    written_date,
    zone,
)

__all__ = ["EVENT_STORES", "LagoStore"]

EVENT_STORES = ("postgres", "clickhouse")
#: When the time-driven changes happen: ``"lago"`` when Lago's clock jobs run them (``clock.rb``: the biller
#: ``Clock::SubscriptionsBillerJob`` hourly at minute 10 issues period-end invoices and applies pending downgrades;
#: ``Clock::TerminateEndedSubscriptionsJob`` hourly at minute 5 terminates the subscriptions whose ``ending_at`` falls
#: on that day), ``"boundary"`` exactly at the period boundary or ``ending_at`` (idealised).
CLOCK_JOBS = ("lago", "boundary")
BILLER_MINUTE = 10
TERMINATOR_MINUTE = 5
METRIC_LOCKED_WHEN_USED = ("code", "aggregation_type", "field_name", "recurring", "weighted_interval", "filters")
PLAN_LOCKED_WHEN_SUBSCRIBED = (
    "code",
    "interval",
    "pay_in_advance",
    "amount_currency",
    "trial_period",
    "bill_charges_monthly",
)
# Plans::UpdateService / the spec (PlanUpdateInput.bill_charges_monthly): only these intervals bill charges monthly
MONTHLY_CHARGES_INTERVALS = ("yearly", "semiannual")
SUBSCRIPTION_STATUSES = ("pending", "active", "terminated", "canceled", "incomplete")
# Invoice::VISIBLE_STATUS: lists leave out generating/open/closed invoices whatever the status filter
VISIBLE_INVOICE_STATUSES = ("draft", "finalized", "voided", "failed", "pending")
AGGREGATION_TYPES = (
    "count_agg",
    "sum_agg",
    "max_agg",
    "unique_count_agg",
    "weighted_sum_agg",
    "latest_agg",
    "custom_agg",
)
CHARGE_MODELS = ("standard", "graduated", "package", "percentage", "volume", "graduated_percentage", "dynamic")
INTERVALS = ("weekly", "monthly", "quarterly", "semiannual", "yearly")
VALUE_TYPES = ("integer", "boolean", "string", "select")
METADATA_MAX_ITEMS = 5
METADATA_KEY_MAX = 20
METADATA_VALUE_MAX = 100
BILLING_ENTITY_CODE = "default"
#: IntegrationCustomer.type (the accounting, tax and CRM integrations a customer is synced with)
INTEGRATION_TYPES = ("netsuite", "anrok", "xero", "hubspot", "salesforce", "avalara")
COUPON_FREQUENCIES = ("once", "recurring", "forever")

CUSTOMER_FIELDS = (
    "name",
    "firstname",
    "lastname",
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
    "url",
    "logo_url",
    "legal_name",
    "legal_number",
    "tax_identification_number",
    "net_payment_term",
    "customer_type",
    "account_type",
    "finalize_zero_amount_invoice",
    "external_salesforce_id",
    "skip_invoice_custom_sections",
)
SUBSCRIPTION_UPDATABLE = (
    "name",
    "consolidate_invoice",
    "purchase_order_number",
    "on_termination_credit_note",
    "on_termination_invoice",
    "progressive_billing_disabled",
)
# The string parameters of each create/update (read through _permit_strings): ids and free text, not the enums and
# codes the handlers check against a list (currency, timezone, interval...), which refuse a wrong type themselves
CUSTOMER_STRINGS = (
    "external_id",
    "name",
    "firstname",
    "lastname",
    "email",
    "address_line1",
    "address_line2",
    "city",
    "state",
    "zipcode",
    "phone",
    "url",
    "logo_url",
    "legal_name",
    "legal_number",
    "tax_identification_number",
    "external_salesforce_id",
)
SUBSCRIPTION_STRINGS = ("external_customer_id", "external_id", "plan_code", "name", "purchase_order_number")
METRIC_STRINGS = ("code", "name", "description", "field_name")
FEATURE_STRINGS = ("code", "name", "description")
PLAN_STRINGS = ("code", "name", "invoice_display_name", "description")
EVENT_STRINGS = ("transaction_id", "external_subscription_id", "code")
#: The amounts in cents of an invoice and of a credit note that the seeding helpers take (InvoiceObject and
#: CreditNoteObject integers, bigint columns in lago-api): each checked, as the code reading them later calls int()
INVOICE_AMOUNTS = (
    "fees_amount_cents",
    "coupons_amount_cents",
    "credit_notes_amount_cents",
    "sub_total_excluding_taxes_amount_cents",
    "taxes_amount_cents",
    "sub_total_including_taxes_amount_cents",
    "prepaid_credit_amount_cents",
    "progressive_billing_credit_amount_cents",
    "total_amount_cents",
    "total_due_amount_cents",
    "total_paid_amount_cents",
)
CREDIT_NOTE_AMOUNTS = (
    "credit_amount_cents",
    "refund_amount_cents",
    "offset_amount_cents",
    "balance_amount_cents",
    "total_amount_cents",
    "taxes_amount_cents",
    "sub_total_excluding_taxes_amount_cents",
    "coupons_adjustment_amount_cents",
)
#: The integers of an applied coupon (AppliedCouponObject), read with int() when invoices consume it
APPLIED_COUPON_INTEGERS = (
    "amount_cents",
    "amount_cents_remaining",
    "frequency_duration",
    "frequency_duration_remaining",
)
#: The fields of a seeded object that the emulator sorts, indexes or compares (texts: an id, dates and times, states),
#: and those it walks as lists of objects, per seeding helper: a number among the dates broke every listing's sort
SEEDED_TEXTS = {
    "invoice": ("lago_id", "issuing_date", "created_at"),
    "wallet": ("lago_id", "created_at"),
    "credit_note": ("lago_id", "created_at"),
    "applied_coupon": ("lago_id", "created_at"),
}
SEEDED_LISTS = {"invoice": ("metadata", "credits", "fees")}
#: lago-api ``Wallet`` validates ``priority`` in 1..50 (OAS WalletObject: "Allowed values: 1-50")
WALLET_PRIORITIES = range(1, 51)

Emit = Callable[[str, str, JSON], None]


def _require_root(body: Any, key: str) -> Any:
    if not isinstance(body, Mapping) or key not in body or body[key] in (None, "", [], {}):
        raise bad_request(key)
    return body[key]


def _entitlements_of(body: Any) -> Any:
    """The ``entitlements`` of an entitlements request: absent or ``{}`` is none (lago-api's controllers read
    ``params.fetch(:entitlements, {})``: a plan's set to none has its entitlements removed); a body that is no JSON
    object is a 400."""
    if not isinstance(body, Mapping):
        raise bad_request("entitlements")
    found = body.get("entitlements")
    return {} if found is None else found


def _page(items: Sequence[JSON], key: str, query: Mapping[str, Any], serialize: Callable[[JSON], JSON]) -> JSON:
    """:func:`~._util.paginate` the records, then serialize the page's alone (serializing every record for each page
    made paging through 20,000 customers quadratic)."""
    result = paginate(items, key, query.get("page"), query.get("per_page"))
    result[key] = [serialize(item) for item in result[key]]
    return result


def _seq(sub: JSON) -> int:
    return int(sub["seq"])


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _str_or_none(value: Any) -> str | None:
    if value is None:
        return None
    return str(value).strip()


def _permit_strings(params: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``params`` with each of ``keys`` (string parameters) as lago-api reads it.

    Rails' ``permit(:key)`` keeps scalars only: an object or an array given for it is dropped, as if absent (a
    required id is then ``value_is_mandatory``, a name on an update is left as it was), never stored as its text.
    A number or a boolean is kept, and the string column it is saved in casts it (ActiveModel ``ImmutableString``:
    ``to_s``, ``true``/``false`` as ``"t"``/``"f"``), so that Lago answers a string where its spec says one."""
    permitted = dict(params)
    for key in keys:
        if key not in permitted:
            continue
        value = permitted[key]
        if isinstance(value, (Mapping, list)):
            del permitted[key]
        elif isinstance(value, bool):
            permitted[key] = "t" if value else "f"
        elif isinstance(value, (int, float)):
            permitted[key] = str(value)
    return permitted


class _Index:
    """The records of one of the store's lists by a key a record never changes (an external id, a customer's
    ``lago_id``, a transaction id), in the list's order: the lookups of a request cost the records it is about, not a
    scan of the whole list (20,000 customers scanned per request made a migration quadratic).

    It follows its list lazily, so that what it answers is always what a scan of the list would: the records
    appended since the last lookup are indexed at the next one, and a list replaced, shortened or rewritten from
    outside (a test forgetting the events it has read) is indexed again from scratch. A record replaced in place by
    one with the same key (an event sent again) needs nothing: positions are kept, not records."""

    __slots__ = ("_covered", "_key", "_last", "_list", "_positions", "_source")

    def __init__(self, source: Callable[[], list[JSON]], key: Callable[[JSON], Any]) -> None:
        self._source = source
        self._key = key
        self._list: list[JSON] | None = None
        self._positions: dict[Any, list[int]] = {}
        self._covered = 0
        self._last: Any = None

    def positions(self, value: Any) -> Sequence[int]:
        """The positions in the list of the records whose key is ``value``, ascending."""
        records = self._source()
        count, covered = len(records), self._covered
        if (
            records is not self._list
            or count < covered
            or (covered and count and self._key(records[covered - 1]) != self._last)
        ):
            self._list, self._positions, covered = records, {}, 0
        if covered < count:
            key, positions = self._key, self._positions
            for position in range(covered, count):
                positions.setdefault(key(records[position]), []).append(position)
            self._covered = count
            self._last = key(records[count - 1])
        return self._positions.get(value, ())

    def records(self, value: Any) -> list[JSON]:
        """The records whose key is ``value``, in the list's order."""
        positions = self.positions(value)
        if not positions:
            return []
        records = self._source()
        return [records[position] for position in positions]


class LagoStore:
    """The state of one Lago organization."""

    def __init__(
        self,
        *,
        event_store: str,
        clock: Callable[[], datetime],
        emit: Emit,
        organization_id: str | None = None,
        clock_jobs: str = "lago",
        clock_job_delay: float = 0.0,
    ) -> None:
        if event_store not in EVENT_STORES:
            raise ConfigurationError(f"event_store must be one of {EVENT_STORES}, got {event_store!r}")
        if clock_jobs not in CLOCK_JOBS:
            raise ConfigurationError(
                f"clock_jobs must be one of {CLOCK_JOBS} (Lago's hourly clock jobs, or exactly at the boundary), "
                f"got {clock_jobs!r}"
            )
        if isinstance(clock_job_delay, bool) or not isinstance(clock_job_delay, (int, float)) or clock_job_delay < 0:
            raise ConfigurationError(
                f"clock_job_delay must be a number of seconds >= 0 (how long a clock job waits in Sidekiq's queue), "
                f"got {clock_job_delay!r}"
            )
        if clock_jobs == "boundary" and clock_job_delay:
            raise ConfigurationError(
                "clock_job_delay applies to Lago's clock jobs: give it with clock_jobs='lago', or leave it at 0"
            )
        self.event_store = event_store
        self.clock_jobs = clock_jobs
        self._job_delay = timedelta(seconds=float(clock_job_delay))
        # Given: this organization's id, kept across clear(), which also seeds its lago_ids (two emulators given two
        # ids are two organizations). Not given: the same id and lago_ids in every emulator fed the same calls.
        self._organization_id = organization_id
        self._clock = clock
        self._emit = emit
        self.lock = threading.RLock()
        self.clear()

    # Infrastructure ----------------------------------------------------------------------------

    def clear(self) -> None:
        with self.lock:
            if self._organization_id is None:
                self._rng = random.Random(0x1A60)
                self.organization_id = self._uuid()
            else:
                self._rng = random.Random(f"lago-org:{self._organization_id}")
                self.organization_id = self._organization_id
            self.customers: list[JSON] = []
            self._customer_index: dict[str, JSON] = {}
            self.metrics: dict[str, JSON] = {}
            self.features: dict[str, JSON] = {}
            self.plans: dict[str, JSON] = {}
            self._plans_by_id: dict[str, JSON] = {}  # deleted plans too: their subscriptions still show them
            self.subscriptions: list[JSON] = []
            self._subscription_by_id: dict[str, JSON] = {}
            self._candidates: list[JSON] = []
            self._candidates_len = 0
            self._candidates_of: list[JSON] | None = None  # (the list the candidates were taken from)
            self._candidates_stale = True
            self.events: list[JSON] = []
            self._event_index: dict[tuple[str, ...], int] = {}
            self._first_ingested: dict[int, str] = {}  # a replaced event's first created_at, by its place in events
            self.invoices: list[JSON] = []
            # what else a customer holds (prepaid credits, coupons, credit notes): seeded (credit notes also made by
            # terminations, see _credit_unused_days), listed, and deducted from subscription invoices (_settle_invoice)
            self.wallets: list[JSON] = []
            self.wallet_transactions: list[JSON] = []  # (the outbound ones paying invoices: _apply_wallets)
            self.applied_coupons: list[JSON] = []
            self.credit_notes: list[JSON] = []
            self._sequences: dict[str, int] = {}
            # (when each active subscription's charges period closes, its lago_id): a min-heap, so that a request
            # only peeks at the earliest close (Clock::SubscriptionsBillerJob, see _close_periods)
            self._closings: list[tuple[datetime, int, str]] = []
            # the active subscriptions whose plan's free trial has not ended yet (see _end_trials)
            self._trials: list[JSON] = []
            # (customer lago_id, external_id) -> the earliest started_at of its subscriptions (lago-api
            # Subscription#initial_started_at, which a trial counts from: see _activate and _trial_end)
            self._first_started: dict[tuple[str, str], datetime] = {}
            self._index_lists()

    def _index_lists(self) -> None:
        """The indexes of the store's lists (see :class:`_Index`): what a request looks up by an id."""
        self._customers_by_external = _Index(lambda: self.customers, lambda c: c["external_id"])
        self._subs_by_external = _Index(lambda: self.subscriptions, lambda s: s["external_id"])
        self._subs_by_customer = _Index(lambda: self.subscriptions, lambda s: s["customer_id"])
        self._subs_by_external_customer = _Index(lambda: self.subscriptions, lambda s: s["external_customer_id"])
        # (a subscription's plan changes: filed under each plan it had, see _file_under_plan; read with its plan_id)
        self._subs_by_plan: dict[str, dict[str, JSON]] = {}
        self._active_by_plan: dict[str, set[str]] = {}  # plan lago_id -> its active subscriptions' lago_ids
        self._active_on_plan: dict[str, str | None] = {}  # subscription lago_id -> the plan it is counted active on
        self._events_by_transaction = _Index(lambda: self.events, lambda e: e["transaction_id"])
        self._events_by_subscription = _Index(lambda: self.events, lambda e: e["external_subscription_id"])
        self._invoices_by_id = _Index(lambda: self.invoices, lambda i: i["lago_id"])
        self._invoices_by_customer = _Index(lambda: self.invoices, lambda i: i["customer_id"])
        self._wallets_by_customer = _Index(lambda: self.wallets, lambda w: w["customer_id"])
        self._coupons_by_customer = _Index(lambda: self.applied_coupons, lambda c: c["customer_id"])
        self._notes_by_customer = _Index(lambda: self.credit_notes, lambda n: n["customer_id"])
        # the subscriptions to examine again for a due transition at the next refresh (made, started, given an
        # ending_at or a next subscription since): see refresh
        self._touched: list[JSON] = []

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _next(self, name: str) -> int:
        self._sequences[name] = self._sequences.get(name, 0) + 1
        return self._sequences[name]

    def now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        return now.astimezone(UTC)

    def snapshot(self) -> str:
        """Canonical JSON of the whole state (sorted keys, no whitespace)."""
        with self.lock:
            overrides = sorted(
                (p for p in self._plans_by_id.values() if p.get("parent_id")), key=lambda p: p["lago_id"]
            )
            state = {
                "organization_id": self.organization_id,
                "event_store": self.event_store,
                "billable_metrics": [self.metrics[c] for c in sorted(self.metrics)],
                "features": [self.features[c] for c in sorted(self.features)],
                "plans": [self.plans[c] for c in sorted(self.plans)],
                # (the plans of plan_overrides, which GET /plans does not list)
                **({"override_plans": overrides} if overrides else {}),
                "customers": self.customers,
                "subscriptions": self.subscriptions,
                "events": self.events,
                "invoices": self.invoices,
                **({"wallets": self.wallets} if self.wallets else {}),
                **({"wallet_transactions": self.wallet_transactions} if self.wallet_transactions else {}),
                **({"applied_coupons": self.applied_coupons} if self.applied_coupons else {}),
                **({"credit_notes": self.credit_notes} if self.credit_notes else {}),
                "sequences": self._sequences,
            }
            return json.dumps(state, sort_keys=True, separators=(",", ":"), default=_json_default)

    # Time-driven transitions (ending_at reached, pending start, downgrade date) -----------------

    def refresh(self) -> None:
        """Apply the transitions Lago's clock jobs would have applied by now.

        Only subscriptions that can change are looked at: the candidate list is rebuilt after a subscription is
        added or updated, or a transition happened, so a request costs O(candidates), not O(subscriptions).
        """
        with self.lock:
            now = self.now()
            changed = True
            while changed:
                changed = self._close_periods(now)
                self._update_candidates()
                delay = self._job_delay
                for sub in list(self._candidates):
                    status = sub["status"]
                    if status == "active":
                        ends = self._ending_run(sub)
                        if ends is not None and ends + delay <= now:
                            # (terminated_at: when the job ran, Time.current in mark_as_terminated!)
                            self._terminate(
                                sub, ends + delay, generate_invoice=sub["on_termination_invoice"] == "generate"
                            )
                            changed = True
                            continue
                        nxt = self._find_sub_by_id(sub.get("next_subscription_id"))
                        if nxt is not None and nxt["status"] == "pending":
                            switch = self._job_run(parse_datetime(nxt.get("switch_at")) or now, BILLER_MINUTE)
                            if switch + delay <= now:
                                self._switch(sub, nxt, switch)
                                changed = True
                    elif status == "pending" and not sub.get("previous_subscription_id"):
                        due = self._activation_due(sub)
                        if due is not None and due <= now:
                            self._activate(sub, due)
                            changed = True
                if changed:
                    self._candidates_stale = True

    def _update_candidates(self) -> None:
        """Bring the candidates of ``refresh`` (the subscriptions that ``_may_transition``, in subscription order) up
        to date at the cost of what changed: the candidates known, the subscriptions added since and those touched
        since (``_touch``: started, given an ``ending_at`` or a next subscription), not every subscription again (a
        scan per new subscription made seeding 20,000 quadratic). A list shortened or replaced from outside is
        examined whole again."""
        subs = self.subscriptions
        count = len(subs)
        if count < self._candidates_len or subs is not self._candidates_of:
            self._candidates = [sub for sub in subs if self._may_transition(sub)]
        elif self._candidates_stale or count != self._candidates_len or self._touched:
            pool = {id(sub): sub for sub in (*self._candidates, *self._touched, *subs[self._candidates_len :])}
            self._candidates = sorted((sub for sub in pool.values() if self._may_transition(sub)), key=_seq)
        else:
            return
        self._candidates_of, self._candidates_len, self._candidates_stale = subs, count, False
        self._touched = []

    def _touch(self, sub: JSON) -> None:
        """``sub`` may have become a candidate of ``refresh`` (see ``_update_candidates``)."""
        self._touched.append(sub)
        self._candidates_stale = True

    def _close_periods(self, now: datetime) -> bool:
        """Issue the invoice of each charges period that ended by ``now`` (lago-api ``Clock::SubscriptionsBillerJob``
        and ``BillSubscriptionJob``: the biller's first run, hourly at minute 10, on the next period's first day in
        the customer's time zone, its time the invoice's; with ``clock_jobs="boundary"``, at the boundary), in the
        order the periods ended. A subscription terminated before that run (its ``ending_at``) or downgraded then
        is not billed here: its termination or its switch bills the period. Returns whether an invoice was
        issued."""
        closings = self._closings
        billed = False
        delay = self._job_delay
        while closings:
            close_at = closings[0][0]
            run = self._job_run(close_at, BILLER_MINUTE)  # (the biller's run billing it: its invoice's timestamp)
            if run + delay > now:
                break
            if self._trials:  # (a trial ending before this period closes is billed first, as it happened first)
                billed = self._end_trials(close_at, before=True) or billed
            _, _, lago_id = heapq.heappop(closings)
            sub = self._find_sub_by_id(lago_id)
            if sub is None or sub["status"] != "active" or sub.get("next_close") != iso(close_at):
                continue
            ends = self._ending_run(sub)
            if ends is not None and ends <= run:
                # (terminated before the biller runs, Lago's *:05 job before its *:10 one: the termination bills this
                # period, see _bill_terminated; the biller skips a subscription whose ending_at is today)
                continue
            nxt = self._find_sub_by_id(sub.get("next_subscription_id"))
            if nxt is not None and nxt["status"] == "pending":
                switch = parse_datetime(nxt.get("switch_at"))
                if switch is not None and switch <= close_at:
                    continue  # (the biller applies the downgrade instead, which bills this period: see _switch)
            self._bill_period(sub, close_at, issued_at=run)
            self._schedule_close(sub, close_at)
            billed = True
        if self._trials:
            billed = self._end_trials(now) or billed
        return billed

    def _end_trials(self, until: datetime, *, before: bool = False) -> bool:
        """lago-api ``Subscriptions::FreeTrialBillingService`` (a clock job): each active subscription whose trial
        ended by ``until`` (before it, with ``before``) gets ``subscription.trial_ended``, and, on a plan paid in
        advance, the invoice of the rest of its period from the trial's end (``BillSubscriptionJob``, charges
        skipped), unless a plan fee was already billed that day or on its first day. Returns whether one ended."""
        ended: list[tuple[datetime, JSON]] = []
        for sub in list(self._trials):
            trial_end = self._trial_end(sub)
            if sub["status"] != "active" or trial_end is None:
                self._trials.remove(sub)
                continue
            ending = self._ending_run(sub)
            if ending is not None and ending <= trial_end:
                continue  # (terminated first: the transition at ending_at drops it)
            if trial_end < until or (trial_end == until and not before):
                ended.append((trial_end, sub))
        ended.sort(key=lambda item: (item[0], item[1]["seq"]))
        for trial_end, sub in ended:
            self._trials.remove(sub)
            self._emit_sub("subscription.trial_ended", sub)
            if self._plan_of(sub)["pay_in_advance"] and not self._plan_fee_billed_on(sub, trial_end):
                self._bill_start(sub, trial_end)
        return bool(ended)

    def _plan_fee_billed_on(self, sub: JSON, trial_end: datetime) -> bool:
        """Whether a plan fee of ``sub`` was invoiced on the (local) day its trial ends or the day it started
        (``FreeTrialBillingService``: ``was_already_billed_today``, ``already_billed_on_day_one?``)."""
        days = {self._local_date(sub, trial_end).isoformat()}
        started = parse_datetime(sub.get("started_at"))
        if started is not None:
            days.add(self._local_date(sub, started).isoformat())
        return any(
            invoice["issuing_date"] in days
            and any(
                f["item"]["type"] == "subscription" and f["lago_subscription_id"] == sub["lago_id"]
                for f in invoice["fees"]
            )
            for invoice in self._invoices_by_customer.records(sub["customer_id"])
            if sub["lago_id"] in invoice["subscription_ids"]
        )

    def _schedule_close(self, sub: JSON, at: datetime) -> None:
        """Remember when the charges period containing ``at`` closes (the second after its last one)."""
        close_at = self._charges_bounds(sub, at)[1] + timedelta(seconds=1)
        sub["next_close"] = iso(close_at)
        heapq.heappush(self._closings, (close_at, sub["seq"], sub["lago_id"]))

    def _bill_period(
        self,
        sub: JSON,
        close_at: datetime,
        *,
        issued_at: datetime | None = None,
        advance: bool = True,
        upgraded_to: JSON | None = None,
    ) -> None:
        """The invoice of the charges period closing at ``close_at``, issued at ``issued_at`` (default
        ``close_at``): its charges, plus the plan's fee when the plan's own period ends there too (in arrears, that
        period's fee; in advance, the next one's, unless not ``advance``: the subscription ended with the period).
        ``upgraded_to``: a downgrade's new subscription, whose first period (paid in advance) the same invoice
        bills (``TerminateService#terminate_and_start_next``). Sends ``invoice.created``. Not emulated: minimum
        commitments, taxes."""
        customer = self._customer_by_id(sub["customer_id"])
        if customer is None:
            return
        issued_at = issued_at or close_at
        last = close_at - timedelta(seconds=1)
        usage = self._usage_for(sub, last, charges=self._invoiced_charges(sub))
        plan = self._plan_of(sub)
        true_ups = self._true_up_amounts(sub, usage, last, None)
        plan_period: tuple[datetime, datetime] | None = None
        plan_fee = 0
        if self._period_bounds(sub, last)[1] == last:
            # in arrears, the period ending here (its first one prorated from the day the subscription started, an
            # upgrade's new plan from the upgrade's day); in advance, the one starting now
            trial_end = self._trial_end(sub)
            if plan["pay_in_advance"] and not advance:
                pass  # (ended with the period: Invoices::CalculateFeesService bills no fee of a terminated plan)
            elif plan["pay_in_advance"] and (
                trial_end is None
                or trial_end <= close_at
                or self._local_date(sub, trial_end) == self._local_date(sub, close_at)
            ):
                plan_period = self._period_bounds(sub, close_at)
                plan_fee = self._plan_fee(sub, *plan_period)
            elif plan["pay_in_advance"]:
                pass  # (in_trial_period_not_ending_today?: billed when the trial ends, see _end_trials)
            else:
                start, end = self._period_bounds(sub, last)
                plan_fee = self._plan_fee(sub, start, end, first=True)
                plan_period = (self._billed_from(sub, start), end)
        new_period: tuple[datetime, datetime] | None = None
        new_fee = 0
        if upgraded_to is not None:
            new_period = self._period_bounds(upgraded_to, issued_at)
            new_fee = self._plan_fee(upgraded_to, *new_period, first=True)
        amount = int(usage["amount_cents"]) + sum(true_ups.values()) + plan_fee + new_fee
        day = self._local_date(sub, issued_at).isoformat()
        invoice = self._new_invoice(
            customer,
            {
                "invoice_type": "subscription",
                "currency": plan["amount_currency"],
                "fees_amount_cents": amount,
                "total_amount_cents": amount,
                "issuing_date": day,
                "payment_due_date": day,
                "created_at": iso(issued_at),
                "updated_at": iso(issued_at),
            },
            subscription=sub,
        )
        invoice["invoice_subscriptions"] = [self._invoice_subscription(sub, usage, None)]
        invoice["fees"] = self._invoice_fees(invoice, sub, usage, true_ups, plan_period, plan_fee)
        if upgraded_to is not None and new_period is not None:
            invoice["subscription_ids"].append(upgraded_to["lago_id"])
            billed = (self._billed_from(upgraded_to, new_period[0]), new_period[1])
            invoice["fees"].append(self._subscription_fee(invoice, upgraded_to, billed, new_fee))
        self._settle_invoice(invoice)
        self._issue(invoice)

    def _trial_end(self, sub: JSON) -> datetime | None:
        """When the plan's free trial ends (lago-api ``Subscription#trial_end_datetime``: ``initial_started_at``, the
        earliest ``started_at`` of the customer's subscriptions with this ``external_id``, plus ``trial_period``
        days), or None without a trial: an upgrade or a downgrade does not restart the trial (its record's
        ``trial_from``, set by ``_activate``, is the first one's start)."""
        days = to_decimal(self._plan_of(sub).get("trial_period")) or Decimal(0)
        started = parse_datetime(sub.get("trial_from") or sub.get("started_at"))
        if days <= 0 or started is None:
            return None
        return started + timedelta(seconds=float(days * 86400))

    def _job_run(self, at: datetime, minute: int) -> datetime:
        """The first run at or after ``at`` of a Lago clock job scheduled hourly at ``minute`` (``clock.rb``:
        clockwork's ``every(1.hour, at: "*:MM")``, in UTC); ``at`` itself with ``clock_jobs="boundary"``."""
        if self.clock_jobs == "boundary":
            return at
        run = at.replace(minute=minute, second=0, microsecond=0)
        return run if run >= at else run + timedelta(hours=1)

    def _ending_run(self, sub: JSON) -> datetime | None:
        """When ``ending_at`` terminates the subscription, or None without one: lago-api's
        ``Clock::TerminateEndedSubscriptionsJob`` (hourly at minute 5) terminates the active subscriptions whose
        ``ending_at`` falls on the current date in the customer's time zone (``DATE(ending_at) = DATE(now)``), so its
        first run on that date, which can be hours before ``ending_at`` itself, and not before ``ending_at`` was set;
        ``ending_at`` with ``clock_jobs="boundary"``."""
        ending = parse_datetime(sub.get("ending_at"))
        if ending is None or self.clock_jobs == "boundary":
            return ending
        start = local_day_start(self._local_date(sub, ending), self._timezone(sub))
        set_at = parse_datetime(sub.get("ending_set_at") or sub.get("created_at"))
        if set_at is not None and set_at > start:
            start = set_at
        return self._job_run(start, TERMINATOR_MINUTE)

    def _switch(self, sub: JSON, nxt: JSON, at: datetime) -> None:
        """Apply a pending downgrade at ``at`` (lago-api ``Clock::SubscriptionsBillerJob``: ``TerminateJob`` with the
        biller's time, ``terminate_and_start_next``): ``sub`` terminated and ``nxt`` started then, and one invoice,
        whatever ``on_termination_invoice``: ``sub``'s last period (its charges, its fee when paid in arrears; no fee
        of a plan paid in advance, whose period ended) and ``nxt``'s first period when its plan is paid in advance."""
        close = parse_datetime(sub.get("next_close"))
        self._terminate(sub, at, generate_invoice=False, cancel_next=False, credit_unused=False)
        self._activate(nxt, at, bill=False)
        upgraded_to = nxt if self._bills_in_advance_at(nxt, at) else None
        if close is not None and close <= at:
            self._bill_period(sub, close, issued_at=at, advance=False, upgraded_to=upgraded_to)
        elif upgraded_to is not None:
            self._bill_start(nxt, at)

    def _bill_pending_close(self, sub: JSON, at: datetime) -> None:
        """Bill the period of ``sub`` that closed before ``at`` when the biller has not billed it yet (with
        ``clock_jobs="lago"``, between the boundary and the biller's run), before it is upgraded at ``at``: its
        charges and its fee in arrears, not the next period's in advance (the upgrade bills the new plan)."""
        close = parse_datetime(sub.get("next_close"))
        if close is not None and close <= at:
            self._bill_period(sub, close, issued_at=at, advance=False)
            self._schedule_close(sub, close)

    def _billed_from(self, sub: JSON, start: datetime) -> datetime:
        """Where the plan period starting at ``start`` is billed from: lago-api ``DatesService#from_datetime``, the
        period's start, or the local start of the day the subscription started when that is later (its first
        period)."""
        started = parse_datetime(sub.get("started_at"))
        if started is None:
            return start
        return max(start, local_day_start(self._local_date(sub, started), self._timezone(sub)))

    def _plan_fee(self, sub: JSON, start: datetime, end: datetime, *, first: bool = False) -> int:
        """The subscription fee of the plan period ``start``..``end`` (its last second), lago-api
        ``Fees::SubscriptionService``: nothing while the trial covers the period; from the trial's end (or, for the
        ``first`` period, from the local start of the day the subscription started, ``DatesService#from_datetime``)
        ``days * amount / period days``, the days counted as ``(to + 1 day - from) / 1 day`` floored, rounded to the
        cent; the full amount otherwise. ``first`` is asked for a pay-in-advance start and for every period billed
        in arrears (``first_subscription_amount`` / ``upgraded_amount``: only the first period can start after
        ``start``, a later one, a subscription backdated before it or one started on its first day is whole)."""
        amount = int(self._plan_of(sub)["amount_cents"])
        trial_end = self._trial_end(sub)
        if trial_end is None and not first:
            return amount
        billed_from = self._billed_from(sub, start) if first else start
        if trial_end is not None:
            if trial_end >= end:
                return 0
            billed_from = max(billed_from, trial_end)
        if billed_from <= start:
            return amount
        duration = _period_days(start, end)
        days = int((end + timedelta(days=1) - billed_from).total_seconds()) // 86400
        return int((Decimal(amount) * days / duration).to_integral_value(rounding=ROUND_HALF_UP))

    def _terminated_plan_fee(self, sub: JSON, start: datetime, end: datetime, at: datetime) -> int:
        """The fee of a plan paid in arrears for its period ``start``..``end`` cut by a termination (or an upgrade) at
        ``at``: lago-api ``Fees::SubscriptionService#terminated_amount``, the days from the period's start (the local
        start of the day the subscription started, or the trial's end, when later) to ``at``, ceiled, times ``amount
        / period days``, rounded to the cent; nothing while the trial lasts."""
        amount = int(self._plan_of(sub)["amount_cents"])
        billed_from = self._billed_from(sub, start)
        trial_end = self._trial_end(sub)
        if trial_end is not None:
            if trial_end >= at:
                return 0
            billed_from = max(billed_from, trial_end)
        duration = _period_days(start, end)
        days = max(Decimal((at - billed_from).total_seconds() / 86400), Decimal(0))
        days = days.to_integral_value(rounding=ROUND_CEILING)
        return int((amount * days / duration).to_integral_value(rounding=ROUND_HALF_UP))

    def _bill_start(self, sub: JSON, at: datetime) -> None:
        """A pay-in-advance plan's first invoice, issued when the subscription starts (lago-api
        ``Subscriptions::CreateService`` / ``ActivateService``: ``BillSubscriptionJob``): the fee of the plan period
        holding ``at``, prorated from ``started_at`` (a calendar subscription started mid-period) or the trial's end;
        a whole one for a subscription started on an earlier day than it was created (``started_in_past?``)."""
        customer = self._customer_by_id(sub["customer_id"])
        if customer is None:
            return
        plan = self._plan_of(sub)
        period = self._period_bounds(sub, at)
        created = parse_datetime(sub.get("created_at"))
        started = parse_datetime(sub.get("started_at")) or at
        in_past = created is not None and self._local_date(sub, started) < self._local_date(sub, created)
        fee = self._plan_fee(sub, *period, first=not in_past)
        day = self._local_date(sub, at).isoformat()
        invoice = self._new_invoice(
            customer,
            {
                "invoice_type": "subscription",
                "currency": plan["amount_currency"],
                "fees_amount_cents": fee,
                "total_amount_cents": fee,
                "issuing_date": day,
                "payment_due_date": day,
            },
            subscription=sub,
        )
        invoice["fees"] = [self._subscription_fee(invoice, sub, (self._billed_from(sub, period[0]), period[1]), fee)]
        self._settle_invoice(invoice)
        self._issue(invoice)

    def _issue(self, invoice: JSON) -> None:
        """Finalize a new subscription invoice and send ``invoice.created``, or, when its fees sum to zero and its
        customer's ``finalize_zero_amount_invoice`` is ``skip``, close it (lago-api
        ``Invoices::TransitionToFinalStatusService``; the organization's default, for ``inherit``, finalizes): a
        ``closed`` invoice sends no webhook, and neither ``GET /invoices`` nor ``GET /invoices/{id}`` shows it
        (``invoices.visible``)."""
        if int(invoice["fees_amount_cents"]) == 0:
            customer = self._customer_by_id(invoice["customer_id"])
            if customer is not None and customer["fields"].get("finalize_zero_amount_invoice") == "skip":
                invoice["status"] = "closed"
                return
        self._emit("invoice.created", "invoice", self._serialize_invoice(invoice, extended=True))

    def _fee(self, invoice: JSON, sub: JSON, amount: int, item: JSON, **fields: Any) -> JSON:
        """One fee of an invoice as ``V1::FeeSerializer`` shows it (no taxes)."""
        subunits = subunits_per_unit(invoice["currency"])
        precise = decimal_str(Decimal(amount) / subunits)
        units = Decimal(fields.get("units", "1"))
        fee: JSON = {
            "lago_id": self._uuid(),
            "lago_charge_id": None,
            "lago_charge_filter_id": None,
            "lago_fixed_charge_id": None,
            "lago_invoice_id": invoice["lago_id"],
            "lago_true_up_fee_id": None,
            "lago_true_up_parent_fee_id": None,
            "lago_subscription_id": sub["lago_id"],
            "lago_customer_id": invoice["customer_id"],
            "external_customer_id": sub["external_customer_id"],
            "external_subscription_id": sub["external_id"],
            "amount_cents": amount,
            "precise_amount": precise,
            "precise_total_amount": precise,
            "amount_currency": invoice["currency"],
            "taxes_amount_cents": 0,
            "taxes_precise_amount": "0.0",
            "taxes_rate": 0.0,
            "units": decimal_str(units),
            "precise_unit_amount": decimal_str(Decimal(amount) / subunits / units) if units else "0.0",
            "total_aggregated_units": decimal_str(units),
            "total_amount_cents": amount,
            "total_amount_currency": invoice["currency"],
            "events_count": None,
            "pay_in_advance": False,
            "invoiceable": True,
            "from_date": None,
            "to_date": None,
            "payment_status": "pending",
            "created_at": invoice["created_at"],
            "succeeded_at": None,
            "failed_at": None,
            "refunded_at": None,
            "event_transaction_id": None,
            "precise_coupons_amount_cents": "0.0",
            "sub_total_excluding_taxes_amount_cents": amount,
            "sub_total_excluding_taxes_precise_amount_cents": decimal_str(Decimal(amount)),
            "amount_details": {},
            "self_billed": False,
            "item": item,
            "applied_taxes": [],
        }
        fee.update(fields)
        return fee

    def _subscription_fee(self, invoice: JSON, sub: JSON, period: tuple[datetime, datetime], amount: int) -> JSON:
        plan = self._plan_of(sub)
        item = {
            "type": "subscription",
            "code": plan["code"],
            "name": plan["name"],
            "description": plan["description"],
            "invoice_display_name": plan["invoice_display_name"] or plan["name"],
            "filter_invoice_display_name": None,
            "filters": None,
            "lago_item_id": sub["lago_id"],
            "item_type": "Subscription",
            "grouped_by": {},
        }
        return self._fee(
            invoice,
            sub,
            amount,
            item,
            pay_in_advance=bool(plan["pay_in_advance"]),
            from_date=iso(period[0]),
            to_date=iso(period[1]),
            amount_details={"plan_amount_cents": int(plan["amount_cents"])},
        )

    def _invoice_fees(
        self,
        invoice: JSON,
        sub: JSON,
        usage: Mapping[str, Any],
        true_ups: Mapping[str, int],
        plan_period: tuple[datetime, datetime] | None,
        plan_fee: int,
    ) -> list[JSON]:
        """A subscription invoice's fees: the plan's (when billed), one per charge billed (its units, amount and
        ``amount_details``), and a true-up fee after a charge billed under its minimum (lago-api
        ``Fees::CreateTrueUpService``: ``true_up_parent_fee``). Their amounts sum to the invoice's."""
        fees = [] if plan_period is None else [self._subscription_fee(invoice, sub, plan_period, plan_fee)]
        charges = {c["lago_id"]: c for c in self._plan_of(sub)["charges"]}
        for charge_usage in usage["charges_usage"]:
            charge = charges.get(charge_usage["charge"]["lago_id"])
            if charge is None:
                continue
            metric = charge_usage["billable_metric"]
            described = next((m for m in self.metrics.values() if m["lago_id"] == metric["lago_id"]), None)
            item = {
                "type": "charge",
                "code": metric["code"],
                "name": metric["name"],
                "description": described.get("description") if described is not None else None,
                "invoice_display_name": charge["invoice_display_name"] or metric["name"],
                "filter_invoice_display_name": None,
                "filters": None,
                "lago_item_id": metric["lago_id"],
                "item_type": "BillableMetric",
                "grouped_by": {},
            }
            common = {
                "lago_charge_id": charge["lago_id"],
                "pay_in_advance": bool(charge["pay_in_advance"]),
                "invoiceable": bool(charge["invoiceable"]),
                "from_date": usage["from_datetime"],
                "to_date": usage["to_datetime"],
            }
            fee = self._fee(
                invoice,
                sub,
                int(charge_usage["amount_cents"]),
                item,
                **common,
                units=charge_usage["units"],
                total_aggregated_units=charge_usage["total_aggregated_units"],
                events_count=charge_usage["events_count"],
                amount_details=_amount_details(charge, Decimal(charge_usage["units"])),
            )
            if fee["units"] == "0.0":
                fee["precise_unit_amount"] = "0.0"
            fees.append(fee)
            true_up = true_ups.get(charge["lago_id"], 0)
            if true_up:
                # (CreateTrueUpService: units 1, events_count 0)
                extra = self._fee(invoice, sub, true_up, copy.deepcopy(item), **common, events_count=0)
                extra["lago_true_up_parent_fee_id"] = fee["lago_id"]
                fee["lago_true_up_fee_id"] = extra["lago_id"]
                fees.append(extra)
        return fees

    def _invoiced_charges(self, sub: JSON) -> list[JSON]:
        """The charges a subscription invoice bills (lago-api ``Invoices::CalculateFeesService``): the invoiceable
        ones, less those paid in advance (billed as their events come), a recurring metric's aside."""
        recurring = {m["lago_id"] for m in self.metrics.values() if m["recurring"]}
        return [
            c
            for c in self._plan_of(sub)["charges"]
            if c["invoiceable"] and (not c["pay_in_advance"] or c["billable_metric_id"] in recurring)
        ]

    def _true_up_amounts(
        self, sub: JSON, usage: Mapping[str, Any], at: datetime, terminated_at: datetime | None
    ) -> dict[str, int]:
        """The true-up fees of the charges billed under their ``min_amount_cents`` (lago-api
        ``Fees::CreateTrueUpService``): the minimum prorated by the days billed (``charges_from_datetime`` to
        ``charges_to_datetime``, or the termination, in days rounded up) over the charges period's days, less the
        charge's amount, rounded to the subunit (lago-api rounds the precise difference)."""
        start, end = self._full_charges_bounds(sub, at)
        duration = _period_days(start, end)
        billed_from = parse_datetime(usage["from_datetime"]) or start
        billed_to = terminated_at if terminated_at is not None and terminated_at < end else end + timedelta(seconds=1)
        days = Decimal((billed_to - billed_from).total_seconds() / 86400).to_integral_value(rounding=ROUND_CEILING)
        minimums = {c["lago_id"]: int(c["min_amount_cents"]) for c in self._plan_of(sub)["charges"]}
        amounts: dict[str, int] = {}
        for charge_usage in usage["charges_usage"]:
            minimum = Decimal(minimums.get(charge_usage["charge"]["lago_id"], 0)) * days / duration
            if minimum > charge_usage["amount_cents"]:
                # (rounded to the subunit: lago-api's CreateTrueUpService rounds the precise difference)
                true_up = (minimum - charge_usage["amount_cents"]).to_integral_value(rounding=ROUND_HALF_UP)
                amounts[charge_usage["charge"]["lago_id"]] = int(true_up)
        return amounts

    @staticmethod
    def _invoice_subscription(sub: JSON, usage: Mapping[str, Any], terminated_at: datetime | None) -> JSON:
        """What an invoice keeps of a subscription's period (lago-api ``InvoiceSubscription`` and the charge fees):
        the charges period, cut at ``terminated_at`` (``DatesService#charges_to_datetime``), and the charges usage
        frozen as billed, which ``past_usage`` answers with."""
        to_datetime = usage["to_datetime"]
        if terminated_at is not None and terminated_at < (parse_datetime(to_datetime) or terminated_at):
            to_datetime = iso(terminated_at)
        return {
            "subscription_id": sub["lago_id"],
            "external_subscription_id": sub["external_id"],
            "charges_from_datetime": usage["from_datetime"],
            "charges_to_datetime": to_datetime,
            "charges_usage": copy.deepcopy(usage["charges_usage"]),
        }

    def _local_date(self, sub: JSON, moment: datetime) -> date:
        """The calendar date of ``moment`` in the time zone of the subscription's customer."""
        return moment.astimezone(self._timezone(sub)).date()

    def _activation_due(self, sub: JSON) -> datetime | None:
        """When Lago's ``Clock::ActivateSubscriptionsJob`` (every 5 minutes) activates a pending subscription, which is
        also its ``started_at`` (``mark_as_active!(Time.current)``): the first run on the *date* of its
        ``subscription_at`` in the customer's time zone (``ActivateAllPendingService``: ``DATE(subscription_at AT TIME
        ZONE tz) <= DATE(now AT TIME ZONE tz)``), i.e. that day's local midnight (the 5 minutes of the job's period
        left out), and not before the subscription was created."""
        start = parse_datetime(sub["subscription_at"])
        if start is None:
            return None
        tz = self._timezone(sub)
        due = local_day_start(start.astimezone(tz).date(), tz)
        created = parse_datetime(sub.get("created_at"))
        return max(due, created) if created is not None else due

    @staticmethod
    def _may_transition(sub: JSON) -> bool:
        status = sub["status"]
        if status == "active":
            return sub.get("ending_at") is not None or sub.get("next_subscription_id") is not None
        return status == "pending" and not sub.get("previous_subscription_id")

    # Customers ---------------------------------------------------------------------------------

    def _customer(self, external_id: str) -> JSON | None:
        for customer in self._customers_by_external.records(external_id):
            if customer["deleted_at"] is None:
                return customer
        return None

    def _customer_ids(self, external_id: Any) -> set[str]:
        """The lago_ids of the customers with that external id, deleted ones too."""
        return {c["lago_id"] for c in self._customers_by_external.records(external_id)}

    def _customer_by_id(self, lago_id: str) -> JSON | None:
        return self._customer_index.get(lago_id)

    def _timezone(self, sub: JSON) -> tzinfo:
        """The subscription's customer's ``applicable_timezone`` (its ``timezone``, else the organization's: UTC)."""
        customer = self._customer_index.get(sub["customer_id"])
        return zone(customer["fields"].get("timezone") if customer is not None else None)

    def _new_customer(self, external_id: str) -> JSON:
        now = iso(self.now())
        seq = self._next("customer")
        customer: JSON = {
            "lago_id": self._uuid(),
            "external_id": external_id,
            "sequential_id": seq,
            "slug": f"LAG-FAKE-{seq:03d}",
            "created_at": now,
            "updated_at": now,
            "deleted_at": None,
            "fields": {},
            "billing_configuration": {},
            "shipping_address": {},
            "integration_customers": [],
            "metadata": [],
        }
        self.customers.append(customer)
        self._customer_index[customer["lago_id"]] = customer
        return customer

    def upsert_customer(self, body: Any) -> JSON:
        params = _permit_strings(_mapping(_require_root(body, "customer")), CUSTOMER_STRINGS)
        with self.lock:
            self.refresh()
            # create_params permits metadata: [:id, :key, :value, :display_in_invoice]: Rails drops a metadata that is
            # not a list (as if not sent) and the items that are not objects
            if "metadata" in params and params["metadata"] is not None:
                if isinstance(params["metadata"], list):
                    params["metadata"] = [item for item in params["metadata"] if isinstance(item, Mapping)]
                else:
                    del params["metadata"]
            # UpsertFromApiService returns early, each alone and before anything else, on too many metadata items,
            # then on an unknown finalize_zero_amount_invoice (null is accepted: "inherit")
            items = params.get("metadata")
            if isinstance(items, list) and len(items) > METADATA_MAX_ITEMS:
                raise validation_error({"metadata": ["invalid_count"]})
            if params.get("finalize_zero_amount_invoice") not in (None, "inherit", "skip", "finalize"):
                raise validation_error({"finalize_zero_amount_invoice": ["invalid_value"]})
            external_id = _str_or_none(params.get("external_id"))
            if not external_id:
                raise validation_error({"external_id": ["value_is_mandatory"]})
            errors: dict[str, list[str]] = {}
            currency = params.get("currency")
            if "currency" in params and currency is not None and not _valid_currency(currency):
                errors["currency"] = ["value_is_invalid"]
            for key, allowed in (
                ("customer_type", ("company", "individual", None)),
                ("account_type", ("customer", "partner")),
            ):
                if key in params and params[key] not in allowed:
                    errors[key] = ["value_is_invalid"]
            timezone = params.get("timezone")
            if timezone is not None and (not isinstance(timezone, str) or timezone not in TIMEZONES):  # (Lago's list)
                errors["timezone"] = ["invalid_timezone"]
            name = params.get("name")
            if isinstance(name, str) and len(name) > 255:  # OAS CustomerCreateInput.name maxLength 255
                errors["name"] = ["value_is_too_long"]
            integrations = params.get("integration_customers")
            if integrations is not None and (
                not isinstance(integrations, list)
                or not all(
                    isinstance(i, Mapping) and i.get("integration_type") in INTEGRATION_TYPES for i in integrations
                )
            ):
                errors["integration_customers"] = ["invalid_format"]
            if "net_payment_term" in params and params["net_payment_term"] is not None:
                term = params["net_payment_term"]
                if isinstance(term, bool) or not isinstance(term, int) or term < 0:
                    errors["net_payment_term"] = ["value_is_invalid"]
            customer = self._customer(external_id)
            if (
                customer is not None
                and "currency" in params
                and self._currency_refused(customer, currency, customer_update=True)
            ):
                # UpsertFromApiService runs UpdateCurrencyService before saving the other fields: this error comes alone
                raise validation_error({"currency": ["currencies_does_not_match"]})
            if errors:  # (customer.save!, before any metadata is written: the customer's errors alone)
                raise validation_error(errors)
            new_metadata: list[JSON] | None = None
            if params.get("metadata") is not None:
                existing_metadata = customer["metadata"] if customer else []
                new_metadata = self._customer_metadata(params["metadata"], existing_metadata, new=customer is None)
            created = customer is None
            if customer is None:
                customer = self._new_customer(external_id)
            for key in CUSTOMER_FIELDS:
                if key in params:
                    customer["fields"][key] = copy.deepcopy(params[key])
            for key in ("billing_configuration", "shipping_address"):
                if isinstance(params.get(key), Mapping):
                    customer[key].update(copy.deepcopy(dict(params[key])))
            for raw in integrations or ():
                self._upsert_integration_customer(customer, raw)
            if new_metadata is not None:
                customer["metadata"] = new_metadata
            customer["updated_at"] = iso(self.now())
            result = self._serialize_customer(customer)
            self._emit("customer.created" if created else "customer.updated", "customer", result)
            return {"customer": result}

    def _upsert_integration_customer(self, customer: JSON, raw: Mapping[str, Any]) -> None:
        """lago-api ``IntegrationCustomers::CreateOrUpdateService``: one integration customer per integration type,
        updated when the customer has one of that type (the emulator has no integrations: any code is taken)."""
        kind = str(raw["integration_type"])
        current = next((i for i in customer["integration_customers"] if i["type"] == kind), None)
        if current is None:
            current = {"lago_id": self._uuid(), "type": kind, "integration_code": None, "external_customer_id": None}
            current.update(sync_with_provider=None, subsidiary_id=None)
            customer["integration_customers"].append(current)
        for key in ("integration_code", "external_customer_id", "sync_with_provider", "subsidiary_id"):
            if key in raw:
                current[key] = copy.deepcopy(raw[key])

    def _editable(self, customer: JSON) -> bool:
        """lago-api ``Customer#editable?``: no subscription, whatever its status, no invoice, no wallet and no
        fixed-amount coupon applied (the emulator has no add-ons, the other thing that makes a customer's currency
        fixed)."""
        lago_id = customer["lago_id"]
        return (
            not self._subs_by_customer.positions(lago_id)
            and not self._invoices_by_customer.positions(lago_id)
            and not self._wallets_by_customer.positions(lago_id)
            and not any(c["amount_cents"] is not None for c in self._coupons_by_customer.records(lago_id))
        )

    def _currency_refused(self, customer: JSON, currency: Any, *, customer_update: bool) -> bool:
        """lago-api ``Customers::UpdateCurrencyService`` (without the ``multi_currency`` feature flag, off by default):
        ``True`` when giving ``currency`` to ``customer`` is ``422 {"currency": ["currencies_does_not_match"]}``.

        The upsert (``customer_update``) may change the currency while the customer is editable; a subscription
        (its plan's currency, or ``plan_overrides.amount_currency``) may only give one to an editable customer
        without a currency, and must otherwise be in the customer's currency."""
        current = customer["fields"].get("currency")
        if current == currency:
            return False
        if customer_update:
            return not self._editable(customer)
        return current not in (None, "") or not self._editable(customer)

    def _customer_metadata(
        self, items: Sequence[Mapping[str, Any]], existing: Sequence[JSON], *, new: bool
    ) -> list[JSON]:
        """The customer's metadata items after an upsert giving ``items``, or the 422 Lago answers.

        As lago-api writes them: one by one, in the list's order (``Customers::Metadata::UpdateService``; for a ``new``
        customer, ``UpsertFromApiService#create_metadata``, every item created), an item carrying the ``id`` of one of
        the customer's items updating it (``update!``: only the attributes given), any other created (``create!``),
        each validated as ``Metadata::CustomerMetadata`` is (key and value present, key unique per customer and at most
        20 characters, value at most 100): the first that fails raises with its own errors alone, and the transaction
        is rolled back. The items left out of the list are deleted last, so an existing key sent again without its
        id collides with the old item."""
        current: dict[str, JSON] = {item["lago_id"]: dict(item) for item in existing}
        created: list[JSON] = []
        listed: set[str] = set()
        for raw in items:
            item_id = None if new or raw.get("id") is None else str(raw["id"])
            if item_id is not None:
                listed.add(item_id)
            target = current.get(item_id) if item_id is not None else None
            record: JSON = (
                dict(target)
                if target is not None
                else {"lago_id": None, "key": None, "value": None, "display_in_invoice": False, "created_at": None}
            )
            for field in ("key", "value"):
                if target is None or field in raw:
                    record[field] = _metadata_text(raw.get(field))
            record["display_in_invoice"] = bool(raw.get("display_in_invoice") or False)
            key, value = record["key"], record["value"]
            errors: dict[str, list[str]] = {}
            if key is None or not key.strip():
                errors.setdefault("key", []).append("value_is_mandatory")
            elif any(other["key"] == key for other in (*current.values(), *created) if other is not target):
                errors.setdefault("key", []).append("value_already_exist")
            if key is not None and len(key) > METADATA_KEY_MAX:
                errors.setdefault("key", []).append("value_is_too_long")
            if value is None or not value.strip():
                errors.setdefault("value", []).append("value_is_mandatory")
            elif len(value) > METADATA_VALUE_MAX:
                errors.setdefault("value", []).append("value_is_too_long")
            if errors:
                raise validation_error(errors)
            if target is not None:
                target.update(record)
            else:
                created.append(record)
        now = iso(self.now())
        for record in created:
            record["lago_id"] = self._uuid()
            record["created_at"] = now
        kept = [item for lago_id, item in current.items() if lago_id in listed]
        return kept + created

    def _serialize_customer(self, customer: JSON) -> JSON:
        f = customer["fields"]
        billing: JSON = {"invoice_grace_period": 0}
        billing.update(
            {
                "subscription_invoice_issuing_date_anchor": None,
                "subscription_invoice_issuing_date_adjustment": None,
            }
        )
        billing.update({k: v for k, v in customer["billing_configuration"].items() if v is not None})
        shipping: JSON = {
            "address_line1": None,
            "address_line2": None,
            "city": None,
            "zipcode": None,
            "state": None,
            "country": None,
        }
        shipping.update(customer["shipping_address"])
        data: JSON = {
            "lago_id": customer["lago_id"],
            "billing_entity_code": BILLING_ENTITY_CODE,
            "external_id": customer["external_id"],
            "sequential_id": customer["sequential_id"],
            "slug": customer["slug"],
            "name": f.get("name"),
            "firstname": f.get("firstname"),
            "lastname": f.get("lastname"),
            "email": f.get("email"),
            "currency": f.get("currency"),
            "timezone": f.get("timezone"),
            "applicable_timezone": f.get("timezone") or "UTC",
            "country": f.get("country"),
            "address_line1": f.get("address_line1"),
            "address_line2": f.get("address_line2"),
            "city": f.get("city"),
            "state": f.get("state"),
            "zipcode": f.get("zipcode"),
            "phone": f.get("phone"),
            "url": f.get("url"),
            "logo_url": f.get("logo_url"),
            "legal_name": f.get("legal_name"),
            "legal_number": f.get("legal_number"),
            "tax_identification_number": f.get("tax_identification_number"),
            "net_payment_term": f.get("net_payment_term"),
            "customer_type": f.get("customer_type"),
            "account_type": f.get("account_type") or "customer",
            "finalize_zero_amount_invoice": f.get("finalize_zero_amount_invoice") or "inherit",
            "skip_invoice_custom_sections": bool(f.get("skip_invoice_custom_sections", False)),
            "created_at": customer["created_at"],
            "updated_at": customer["updated_at"],
            "billing_configuration": billing,
            "shipping_address": shipping,
            "metadata": copy.deepcopy(customer["metadata"]),
            "integration_customers": [_serialize_integration(i) for i in customer["integration_customers"]],
            "taxes": [],
            "applicable_invoice_custom_sections": [],
        }
        if "external_salesforce_id" in f:
            data["external_salesforce_id"] = f["external_salesforce_id"]
        return data

    def get_customer(self, external_id: str) -> JSON:
        with self.lock:
            self.refresh()
            customer = self._customer(external_id)
            if customer is None:
                raise not_found("customer")
            return {"customer": self._serialize_customer(customer)}

    def delete_customer(self, external_id: str) -> JSON:
        with self.lock:
            self.refresh()
            customer = self._customer(external_id)
            if customer is None:
                raise not_found("customer")
            now = self.now()
            customer["deleted_at"] = iso(now)
            # Customers::TerminateRelationsService: TerminateService for the active subscriptions (invoiced per their
            # on_termination_invoice), mark_as_canceled! (no webhook) for the pending ones
            for sub in self._subs_by_customer.records(customer["lago_id"]):
                if sub["status"] == "active":
                    self._terminate(sub, now, generate_invoice=sub["on_termination_invoice"] == "generate")
                elif sub["status"] == "pending":
                    self._mark_as_canceled(sub, now)
            # (and terminates its applied coupons and wallets)
            held_by = customer["lago_id"]
            for held in (*self._coupons_by_customer.records(held_by), *self._wallets_by_customer.records(held_by)):
                if held["status"] == "active":
                    held["status"], held["terminated_at"] = "terminated", iso(now)
            return {"customer": self._serialize_customer(customer)}

    def list_customers(self, query: Mapping[str, Any], multi: Mapping[str, list[str]]) -> JSON:
        with self.lock:
            self.refresh()
            # lago-api CustomersQuery (and the customers_controller#index params it is given)
            self._check_billing_entity_codes(multi)
            term = str(query.get("search_term") or "").strip().lower()
            if query.get("external_id"):
                pool = self._customers_by_external.records(query["external_id"])
            else:
                pool = self.customers
            items = [c for c in pool if c["deleted_at"] is None]
            if query.get("external_id"):
                items = [c for c in items if c["external_id"] == query["external_id"]]
            elif term:  # search_term is not applied together with external_id

                def matches(c: JSON) -> bool:
                    f = c["fields"]
                    haystack = [c["external_id"], *(f.get(k) for k in ("name", "firstname", "lastname", "legal_name"))]
                    return any(term in str(v).lower() for v in (*haystack, f.get("email")) if v)

                items = [c for c in items if matches(c)]
            for param, field in (
                ("currencies[]", "currency"),
                ("countries[]", "country"),
                ("states[]", "state"),
                ("zipcodes[]", "zipcode"),
                ("account_type[]", "account_type"),
            ):
                if multi.get(param):
                    wanted = set(multi[param])
                    items = [c for c in items if (c["fields"].get(field) or _default_field(field)) in wanted]
            items = [c for c in items if _metadata_matches(c["metadata"], query)]
            if query.get("customer_type"):
                items = [c for c in items if c["fields"].get("customer_type") == query["customer_type"]]
            elif "has_customer_type" in query:  # has_customer_type=false: customers without a customer_type
                wanted_type = _boolean(query["has_customer_type"])
                items = [c for c in items if (c["fields"].get("customer_type") is not None) == wanted_type]
            if "has_tax_identification_number" in query:
                wanted_tax_id = _boolean(query["has_tax_identification_number"])
                items = [
                    c for c in items if (c["fields"].get("tax_identification_number") is not None) == wanted_tax_id
                ]
            items = sorted(items, key=lambda c: (c["created_at"], c["sequential_id"]), reverse=True)
            return _page(items, "customers", query, self._serialize_customer)

    @staticmethod
    def _check_billing_entity_codes(multi: Mapping[str, list[str]]) -> None:
        """``billing_entity_codes[]`` filters: the emulated organization has one billing entity, ``default``; any other
        code is ``404 billing_entity_not_found`` (lago-api ``SubscriptionIndex``/``InvoiceIndex``/customers#index)."""
        codes = [c for key in ("billing_entity_codes[]", "billing_entity_code") for c in multi.get(key, []) if c]
        if any(code != BILLING_ENTITY_CODE for code in codes):
            raise not_found("billing_entity")

    # Billable metrics --------------------------------------------------------------------------

    def create_metric(self, body: Any) -> JSON:
        params = _permit_strings(_mapping(_require_root(body, "billable_metric")), METRIC_STRINGS)
        with self.lock:
            errors: dict[str, list[str]] = {}
            code = _str_or_none(params.get("code"))
            name = params.get("name")
            if not code:
                errors["code"] = ["value_is_mandatory"]
            elif code in self.metrics:
                errors["code"] = ["value_already_exist"]
            if not name:
                errors["name"] = ["value_is_mandatory"]
            aggregation = params.get("aggregation_type")
            if aggregation not in AGGREGATION_TYPES:
                errors["aggregation_type"] = ["value_is_invalid"]
            field_name = params.get("field_name")
            if aggregation not in ("count_agg", "custom_agg", None) and not field_name:
                errors["field_name"] = ["value_is_mandatory"]
            filters = params.get("filters") or []
            if not _valid_metric_filters(filters):
                errors["filters"] = ["invalid_format"]
            if params.get("rounding_function") not in (None, "round", "ceil", "floor"):
                errors["rounding_function"] = ["value_is_invalid"]
            if errors:
                raise validation_error(errors)
            assert code is not None
            metric: JSON = {
                "lago_id": self._uuid(),
                "name": str(name),
                "code": code,
                "description": params.get("description"),
                "aggregation_type": aggregation,
                "field_name": field_name if aggregation != "count_agg" else None,
                "recurring": bool(params.get("recurring", False)),
                "expression": params.get("expression"),
                "rounding_function": params.get("rounding_function"),
                "rounding_precision": params.get("rounding_precision"),
                "weighted_interval": params.get("weighted_interval")
                or ("seconds" if aggregation == "weighted_sum_agg" else None),
                "filters": [{"key": f["key"], "values": [str(v) for v in f["values"]]} for f in filters],
                "created_at": iso(self.now()),
            }
            self.metrics[code] = metric
            result = self._serialize_metric(metric)
            # (Webhooks::BillableMetrics::CreatedService, as for plans and features)
            self._emit("billable_metric.created", "billable_metric", result)
            return {"billable_metric": result}

    def _serialize_metric(self, metric: JSON) -> JSON:
        data = {k: copy.deepcopy(v) for k, v in metric.items()}
        data.update({"active_subscriptions_count": 0, "draft_invoices_count": 0, "plans_count": 0})
        data["plans_count"] = sum(
            1 for p in self.plans.values() if any(ch["billable_metric_id"] == metric["lago_id"] for ch in p["charges"])
        )
        return drop_none(data, "expression")

    def get_metric(self, code: str) -> JSON:
        with self.lock:
            metric = self.metrics.get(code)
            if metric is None:
                raise not_found("billable_metric")
            return {"billable_metric": self._serialize_metric(metric)}

    def update_metric(self, code: str, body: Any) -> JSON:
        """``PUT /billable_metrics/{code}`` (lago-api ``BillableMetrics::UpdateService``): ``name``, ``description`` and
        the rounding/expression options always; ``code``, ``aggregation_type``, ``field_name``, ``recurring``,
        ``weighted_interval`` and ``filters`` only while no plan charges for the metric."""
        params = _permit_strings(_mapping(_require_root(body, "billable_metric")), METRIC_STRINGS)
        with self.lock:
            metric = self.metrics.get(code)
            if metric is None:
                raise not_found("billable_metric")
            used = any(
                ch["billable_metric_id"] == metric["lago_id"] for p in self.plans.values() for ch in p["charges"]
            )
            errors: dict[str, list[str]] = {}
            if "name" in params and not params["name"]:
                errors["name"] = ["value_is_mandatory"]
            locked = {} if used else {k: params[k] for k in METRIC_LOCKED_WHEN_USED if k in params}
            new_code = _str_or_none(locked["code"]) if "code" in locked else code
            if not new_code:
                errors["code"] = ["value_is_mandatory"]
            elif new_code != code and new_code in self.metrics:
                errors["code"] = ["value_already_exist"]
            aggregation = locked.get("aggregation_type", metric["aggregation_type"])
            if aggregation not in AGGREGATION_TYPES:
                errors["aggregation_type"] = ["value_is_invalid"]
            field_name = locked.get("field_name", metric["field_name"])
            if aggregation not in ("count_agg", "custom_agg") and not field_name:
                errors["field_name"] = ["value_is_mandatory"]
            filters = locked.get("filters", metric["filters"]) or []
            if not _valid_metric_filters(filters):
                errors["filters"] = ["invalid_format"]
            if errors:
                raise validation_error(errors)
            assert new_code is not None
            for key in ("name", "description", "expression", "rounding_function", "rounding_precision"):
                if key in params:
                    metric[key] = params[key]
            metric["aggregation_type"] = aggregation
            metric["field_name"] = field_name if aggregation != "count_agg" else None
            if "recurring" in locked:
                metric["recurring"] = bool(locked["recurring"])
            if "weighted_interval" in locked:
                metric["weighted_interval"] = locked["weighted_interval"]
            metric["filters"] = [{"key": f["key"], "values": [str(v) for v in f["values"]]} for f in filters]
            if new_code != code:
                del self.metrics[code]
                self.metrics[new_code] = metric
                metric["code"] = new_code
            result = self._serialize_metric(metric)
            self._emit("billable_metric.updated", "billable_metric", result)
            return {"billable_metric": result}

    def delete_metric(self, code: str) -> JSON:
        """``DELETE /billable_metrics/{code}`` (lago-api ``BillableMetrics::DestroyService``): the plans' charges for it
        go too. Answers the metric as it was, and sends ``billable_metric.deleted``."""
        with self.lock:
            metric = self.metrics.get(code)
            if metric is None:
                raise not_found("billable_metric")
            result = self._serialize_metric(metric)
            del self.metrics[code]
            for plan in self.plans.values():
                kept = [ch for ch in plan["charges"] if ch["billable_metric_id"] != metric["lago_id"]]
                if len(kept) != len(plan["charges"]):
                    plan["charges"] = kept
                    plan["updated_at"] = iso(self.now())
            self._emit("billable_metric.deleted", "billable_metric", result)
            return {"billable_metric": result}

    def list_metrics(self, query: Mapping[str, Any]) -> JSON:
        with self.lock:
            items = sorted(self.metrics.values(), key=lambda m: m["created_at"], reverse=True)
            return paginate(
                [self._serialize_metric(m) for m in items], "billable_metrics", query.get("page"), query.get("per_page")
            )

    # Features and entitlements -----------------------------------------------------------------

    def create_feature(self, body: Any) -> JSON:
        params = _permit_strings(_mapping(_require_root(body, "feature")), FEATURE_STRINGS)
        with self.lock:
            errors: dict[str, list[str]] = {}
            code = _str_or_none(params.get("code"))
            if not code:
                errors["code"] = ["value_is_mandatory"]
            elif code in self.features:
                errors["code"] = ["value_already_exist"]
            privileges = self._parse_privileges(params.get("privileges"), errors, duplicate="value_already_exist")
            if errors:
                raise validation_error(errors)
            assert code is not None
            feature: JSON = {
                "lago_id": self._uuid(),
                "code": code,
                "name": params.get("name"),
                "description": params.get("description"),
                "privileges": privileges,
                "created_at": iso(self.now()),
            }
            self.features[code] = feature
            result = copy.deepcopy(feature)
            self._emit("feature.created", "feature", result)
            return {"feature": result}

    @staticmethod
    def _parse_privileges(
        raw_privileges: Any, errors: dict[str, list[str]], *, duplicate: str, existing: Collection[str] = ()
    ) -> list[JSON]:
        """Validate a feature's ``privileges`` input; ``duplicate`` is the error code of a repeated privilege code.
        The type of the ``existing`` privileges is not checked again: an update keeps it."""
        privileges: list[JSON] = []
        if raw_privileges is None:
            return privileges
        if not isinstance(raw_privileges, list):
            errors["privileges"] = ["invalid_format"]
            return privileges
        seen: set[str] = set()
        for raw in raw_privileges:
            if not isinstance(raw, Mapping) or not raw.get("code"):
                errors.setdefault("privilege.code", []).append("value_is_mandatory")
                continue
            # (lago-api Entitlement::Privilege: ``attribute :value_type, :string, default: "string"``)
            value_type = raw.get("value_type") or "string"
            pcode = str(raw["code"]).strip()
            if pcode in seen:
                errors["privilege.code"] = [duplicate]
            seen.add(pcode)
            config = dict(_mapping(raw.get("config")))
            if pcode not in existing:
                if value_type not in VALUE_TYPES:
                    errors["privilege.value_type"] = ["value_is_invalid"]
                if value_type == "select" and not config.get("select_options"):
                    errors["privilege.config"] = ["invalid_format"]
            privileges.append({"code": pcode, "name": raw.get("name"), "value_type": value_type, "config": config})
        return privileges

    def update_feature(self, code: str, body: Any) -> JSON:
        """``PUT /features/{code}``, a partial update (lago-api ``FeatureUpdateService`` with ``partial: true``):
        ``name``/``description`` when given; each listed privilege is created, or has its ``name`` replaced and its
        ``select_options`` extended (value_type and other privileges untouched)."""
        params = _permit_strings(_mapping(_require_root(body, "feature")), FEATURE_STRINGS)
        with self.lock:
            feature = self.features.get(code)
            if feature is None:
                raise not_found("feature")
            errors: dict[str, list[str]] = {}
            known = [p["code"] for p in feature["privileges"]]
            given = self._parse_privileges(
                params.get("privileges"), errors, duplicate="value_is_duplicated", existing=known
            )
            if errors:
                raise validation_error(errors)
            for key in ("name", "description"):
                if key in params:
                    feature[key] = params[key]
            for raw, item in zip(params.get("privileges") or [], given, strict=True):  # (no item is skipped)
                existing = self._privilege(feature, item["code"])
                if existing is None:
                    feature["privileges"].append(item)
                    continue
                if "name" in raw:
                    existing["name"] = item["name"]
                options = item["config"].get("select_options")
                if options:
                    current = list(existing["config"].get("select_options") or [])
                    existing["config"]["select_options"] = current + [o for o in options if o not in current]
            result = copy.deepcopy(feature)
            self._emit("feature.updated", "feature", result)
            self._emit_plans_using(code)
            return {"feature": result}

    def delete_feature(self, code: str) -> JSON:
        """``DELETE /features/{code}``: the feature leaves every plan and subscription (``FeatureDestroyService``)."""
        with self.lock:
            feature = self.features.get(code)
            if feature is None:
                raise not_found("feature")
            plans = [p for p in self.plans.values() if code in p["entitlements"]]
            del self.features[code]
            for plan in plans:
                del plan["entitlements"][code]
            for sub in self.subscriptions:
                sub["entitlement_overrides"].pop(code, None)
                sub["entitlement_removals"].pop(code, None)
            result = copy.deepcopy(feature)
            for plan in plans:
                self._emit("plan.updated", "plan", self._serialize_plan(plan))
            self._emit("feature.deleted", "feature", result)
            return {"feature": result}

    def delete_feature_privilege(self, code: str, privilege_code: str) -> JSON:
        """``DELETE /features/{code}/privileges/{privilege_code}``: also gone from every plan and subscription."""
        with self.lock:
            feature = self.features.get(code)
            if feature is None:
                raise not_found("feature")
            privilege = self._privilege(feature, privilege_code)
            if privilege is None:
                raise not_found("privilege")
            feature["privileges"].remove(privilege)
            for plan in self.plans.values():
                plan["entitlements"].get(code, {}).pop(privilege_code, None)
            for sub in self.subscriptions:
                sub["entitlement_overrides"].get(code, {}).pop(privilege_code, None)
                removed = sub["entitlement_removals"].get(code)
                if removed and privilege_code in removed:
                    removed.remove(privilege_code)
            result = copy.deepcopy(feature)
            self._emit_plans_using(code)
            self._emit("feature.updated", "feature", result)
            return {"feature": result}

    def _emit_plans_using(self, feature_code: str) -> None:
        for plan in self.plans.values():
            if feature_code in plan["entitlements"]:
                self._emit("plan.updated", "plan", self._serialize_plan(plan))

    def get_feature(self, code: str) -> JSON:
        with self.lock:
            feature = self.features.get(code)
            if feature is None:
                raise not_found("feature")
            return {"feature": copy.deepcopy(feature)}

    def list_features(self, query: Mapping[str, Any]) -> JSON:
        with self.lock:
            items = sorted(self.features.values(), key=lambda f: f["created_at"], reverse=True)
            term = str(query.get("search_term") or "").strip().lower()
            if term:  # Entitlement::FeaturesQuery: name, code or description contains the term
                items = [
                    f for f in items if any(term in str(f[k] or "").lower() for k in ("name", "code", "description"))
                ]
            return _page(items, "features", query, copy.deepcopy)

    def _privilege(self, feature: JSON, code: str) -> JSON | None:
        for privilege in feature["privileges"]:
            if privilege["code"] == code:
                return privilege  # type: ignore[no-any-return]
        return None

    def _check_entitlements(self, raw: Any) -> dict[str, dict[str, Any]]:
        """Validate ``{"feature": {"privilege": value}}`` and cast values to their declared type."""
        if not isinstance(raw, Mapping):
            raise bad_request("entitlements")
        result: dict[str, dict[str, Any]] = {}
        for feature_code, privileges in raw.items():
            feature = self.features.get(str(feature_code))
            if feature is None:
                raise not_found("feature")
            values: dict[str, Any] = {}
            for privilege_code, value in _mapping(privileges).items():
                privilege = self._privilege(feature, str(privilege_code))
                if privilege is None:
                    raise not_found("privilege")
                cast = _cast_privilege(privilege, value)
                if isinstance(cast, _Refusal):  # (lago-api raises at the first value it refuses: one error)
                    raise validation_error({cast.field: [cast.error]})
                values[str(privilege_code)] = cast
            result[str(feature_code)] = values
        return result

    def _serialize_plan_entitlements(self, plan: JSON) -> list[JSON]:
        out: list[JSON] = []
        for feature_code, values in plan["entitlements"].items():
            feature = self.features.get(feature_code)
            if feature is None:
                continue
            privileges = []
            for privilege in feature["privileges"]:
                if privilege["code"] in values:
                    privileges.append({**copy.deepcopy(privilege), "value": values[privilege["code"]]})
            out.append(
                {
                    "code": feature["code"],
                    "name": feature["name"],
                    "description": feature["description"],
                    "privileges": privileges,
                }
            )
        return out

    def set_plan_entitlements(self, code: str, body: Any, *, merge: bool) -> JSON:
        raw = _entitlements_of(body) if not merge or body else {}
        with self.lock:
            plan = self.plans.get(code)
            if plan is None:
                raise not_found("plan")
            checked = self._check_entitlements(raw)
            if merge:
                for feature_code, values in checked.items():
                    plan["entitlements"].setdefault(feature_code, {}).update(values)
            else:
                plan["entitlements"] = checked
            plan["updated_at"] = iso(self.now())
            # (PlanEntitlementsUpdateService sends it after commit, "even if no changes were made")
            self._emit("plan.updated", "plan", self._serialize_plan(plan))
            return {"entitlements": self._serialize_plan_entitlements(plan)}

    def get_plan_entitlements(self, code: str) -> JSON:
        with self.lock:
            plan = self.plans.get(code)
            if plan is None:
                raise not_found("plan")
            return {"entitlements": self._serialize_plan_entitlements(plan)}

    def _plan_entitlement(self, code: str, feature_code: str) -> tuple[JSON, JSON]:
        """The plan and its entitlement to ``feature_code``: 404 ``plan_not_found``, then ``entitlement_not_found``."""
        plan = self.plans.get(code)
        if plan is None:
            raise not_found("plan")
        entitlement = next((e for e in self._serialize_plan_entitlements(plan) if e["code"] == feature_code), None)
        if entitlement is None:
            raise not_found("entitlement")
        return plan, entitlement

    def get_plan_entitlement(self, code: str, feature_code: str) -> JSON:
        """``GET /plans/{code}/entitlements/{feature_code}``: ``{"entitlement": {...}}``."""
        with self.lock:
            return {"entitlement": self._plan_entitlement(code, feature_code)[1]}

    def delete_plan_entitlement(self, code: str, feature_code: str) -> JSON:
        """``DELETE /plans/{code}/entitlements/{feature_code}``: answers the removed entitlement
        (``PlanEntitlementDestroyService``). Subscriptions of the plan keep their own overrides of it, if any."""
        with self.lock:
            plan, entitlement = self._plan_entitlement(code, feature_code)
            del plan["entitlements"][feature_code]
            plan["updated_at"] = iso(self.now())
            self._emit("plan.updated", "plan", self._serialize_plan(plan))
            return {"entitlement": entitlement}

    def delete_plan_entitlement_privilege(self, code: str, feature_code: str, privilege_code: str) -> JSON:
        """``DELETE /plans/{code}/entitlements/{feature_code}/privileges/{privilege_code}``: the plan's value for that
        privilege is removed; 404 ``privilege_not_found`` when the plan has none
        (``PlanEntitlementPrivilegeDestroyService``)."""
        with self.lock:
            plan, _ = self._plan_entitlement(code, feature_code)
            values = plan["entitlements"][feature_code]
            if privilege_code not in values:
                raise not_found("privilege")
            del values[privilege_code]
            plan["updated_at"] = iso(self.now())
            self._emit("plan.updated", "plan", self._serialize_plan(plan))
            return {"entitlement": self._plan_entitlement(code, feature_code)[1]}

    def _serialize_sub_entitlements(self, sub: JSON) -> list[JSON]:
        """``Entitlement::SubscriptionEntitlement.for_subscription``: the plan's entitlements with the subscription's
        overrides, minus what was removed for this subscription (a feature whose every privilege is removed goes)."""
        plan = self._entitlements_plan(sub)
        overrides: dict[str, dict[str, Any]] = sub["entitlement_overrides"]
        removals: dict[str, list[str] | None] = sub["entitlement_removals"]
        codes = list(plan["entitlements"]) + [c for c in overrides if c not in plan["entitlements"]]
        out: list[JSON] = []
        for feature_code in codes:
            feature = self.features.get(feature_code)
            if feature is None or (feature_code in removals and removals[feature_code] is None):
                continue
            plan_values = plan["entitlements"].get(feature_code, {})
            feature_overrides = overrides.get(feature_code, {})
            removed = set(removals.get(feature_code) or ())
            privileges = []
            listed = 0
            for privilege in feature["privileges"]:
                pcode = privilege["code"]
                if pcode not in plan_values and pcode not in feature_overrides:
                    continue
                listed += 1
                if pcode in removed and pcode not in feature_overrides:
                    continue
                override = feature_overrides.get(pcode)
                plan_value = plan_values.get(pcode)
                privileges.append(
                    {
                        **copy.deepcopy(privilege),
                        "value": override if override is not None else plan_value,
                        "plan_value": plan_value,
                        "override_value": override,
                    }
                )
            if listed and not privileges:
                continue
            out.append(
                {
                    "code": feature["code"],
                    "name": feature["name"],
                    "description": feature["description"],
                    "privileges": privileges,
                    "overrides": dict(feature_overrides),
                }
            )
        return out

    def get_sub_entitlements(self, external_id: str, status: str | None) -> JSON:
        with self.lock:
            self.refresh()
            sub = self._sub_for(external_id, status or "active")
            return {"entitlements": self._serialize_sub_entitlements(sub)}

    def patch_sub_entitlements(self, external_id: str, status: str | None, body: Any) -> JSON:
        """``PATCH /subscriptions/{id}/entitlements`` (lago-api ``SubscriptionEntitlementCoreUpdateService``, partial):
        a feature or privilege set again is no longer removed; a value equal to the plan's is no override (the plan's
        value shows, ``override_value`` null), and a feature set exactly as the plan has it is back to the plan's."""
        raw = _entitlements_of(body)
        with self.lock:
            self.refresh()
            sub = self._sub_for(external_id, status or "active")
            checked = self._check_entitlements(raw)
            plan = self._entitlements_plan(sub)
            overrides: dict[str, dict[str, Any]] = sub["entitlement_overrides"]
            removals: dict[str, list[str] | None] = sub["entitlement_removals"]
            for feature_code, values in checked.items():
                plan_values: dict[str, Any] | None = plan["entitlements"].get(feature_code)
                if removals.get(feature_code, []) is None:
                    del removals[feature_code]
                if plan_values is not None and values == plan_values:
                    overrides.pop(feature_code, None)
                    removals.pop(feature_code, None)
                    continue
                feature_overrides = overrides.setdefault(feature_code, {})
                removed = removals.get(feature_code) or []
                for privilege_code, value in values.items():
                    if privilege_code in removed:
                        removed.remove(privilege_code)
                    if (
                        plan_values is not None
                        and privilege_code in plan_values
                        and plan_values[privilege_code] == value
                    ):
                        feature_overrides.pop(privilege_code, None)
                    else:
                        feature_overrides[privilege_code] = value
            result = self._serialize_sub_entitlements(sub)
            self._emit_sub("subscription.updated", sub)
            return {"entitlements": result}

    def _removal_target(self, external_id: str, status: str | None, feature_code: str) -> tuple[JSON, JSON]:
        sub = self._sub_for(external_id, status or "active")
        feature = self.features.get(feature_code)
        if feature is None:
            raise not_found("feature")
        return sub, feature

    def remove_sub_entitlement(self, external_id: str, status: str | None, feature_code: str) -> JSON:
        """``DELETE /subscriptions/{id}/entitlements/{feature_code}`` (lago-api ``SubscriptionFeatureRemoveService``):
        the subscription's overrides of the feature go and, when the plan has the feature, the feature is removed for
        this subscription. Answers the subscription's entitlements as ``{"entitlements": [...]}`` (what the controller
        renders; the OpenAPI spec documents a single ``{"entitlement": ...}``)."""
        with self.lock:
            self.refresh()
            sub, _ = self._removal_target(external_id, status, feature_code)
            sub["entitlement_overrides"].pop(feature_code, None)
            sub["entitlement_removals"].pop(feature_code, None)
            if feature_code in self._entitlements_plan(sub)["entitlements"]:
                sub["entitlement_removals"][feature_code] = None
            result = self._serialize_sub_entitlements(sub)
            self._emit_sub("subscription.updated", sub)
            return {"entitlements": result}

    def remove_sub_entitlement_privilege(
        self, external_id: str, status: str | None, feature_code: str, privilege_code: str
    ) -> JSON:
        """``DELETE /subscriptions/{id}/entitlements/{feature_code}/privileges/{privilege_code}``
        (``SubscriptionFeaturePrivilegeRemoveService``): the override goes and, when the plan has the feature, the
        privilege is removed for this subscription. Same answer as :meth:`remove_sub_entitlement`."""
        with self.lock:
            self.refresh()
            sub, feature = self._removal_target(external_id, status, feature_code)
            if self._privilege(feature, privilege_code) is None:
                raise not_found("privilege")
            feature_overrides = sub["entitlement_overrides"].get(feature_code)
            if feature_overrides is not None:
                feature_overrides.pop(privilege_code, None)
            removals: dict[str, list[str] | None] = sub["entitlement_removals"]
            if (
                feature_code in self._entitlements_plan(sub)["entitlements"]
                and removals.get(feature_code, []) is not None
            ):
                removed = removals.setdefault(feature_code, [])
                if removed is not None and privilege_code not in removed:
                    removed.append(privilege_code)
            result = self._serialize_sub_entitlements(sub)
            self._emit_sub("subscription.updated", sub)
            return {"entitlements": result}

    # Plans -------------------------------------------------------------------------------------

    def _metric_for_charge(self, raw: Mapping[str, Any]) -> JSON | None:
        ref = raw.get("billable_metric_id")
        if ref is not None:
            for metric in self.metrics.values():
                if metric["lago_id"] == ref:
                    return metric
        code = raw.get("billable_metric_code")
        if code is not None:
            return self.metrics.get(str(code))
        if ref is not None:
            return self.metrics.get(str(ref))
        return None

    def _build_charges(self, raw_charges: Any, errors: dict[str, list[str]]) -> list[JSON]:
        """Validate a plan's ``charges`` input (an unknown metric is ``404 billable_metric_not_found``)."""
        if not raw_charges:
            return []
        if not isinstance(raw_charges, list):
            errors["charges"] = ["invalid_format"]
            return []
        charges: list[JSON] = []
        for raw in raw_charges:
            raw = _mapping(raw)
            metric = self._metric_for_charge(raw)
            if metric is None:
                raise not_found("billable_metric")
            model = raw.get("charge_model") or "standard"
            if model not in CHARGE_MODELS:
                errors["charge_model"] = ["value_is_invalid"]
                continue
            # What the emulator cannot compute is refused rather than billed as something else: a custom_agg
            # metric's expression is not evaluated, and charges are not prorated (Charge#validate_prorated refuses
            # proration outside recurring metrics with standard / graduated / volume charges, as Lago does)
            if metric["aggregation_type"] == "custom_agg":
                errors["billable_metric"] = ["custom_aggregation_not_supported_by_the_emulator"]
            if raw.get("prorated"):
                prorable = metric["recurring"] and model in ("standard", "graduated", "volume")
                errors["prorated"] = [
                    "proration_not_supported_by_the_emulator" if prorable else "invalid_billable_metric_or_charge_model"
                ]
            properties = dict(_mapping(raw.get("properties")))
            if "grouped_by" in properties and "pricing_group_keys" not in properties:
                properties["pricing_group_keys"] = properties.pop("grouped_by")
            if model == "standard":
                properties.setdefault("amount", "0")
                if to_decimal(properties["amount"]) is None:
                    errors["properties.amount"] = ["value_is_invalid"]
            elif model in ("percentage", "graduated_percentage", "package", "graduated", "volume"):
                codes = (
                    _percentage_errors(model, properties, metric)
                    if model in ("percentage", "graduated_percentage")
                    else _package_and_ranges_errors(model, properties)
                )
                if codes:
                    known = errors.setdefault("properties", [])
                    known.extend(c for c in codes if c not in known)
            charge_filters = []
            for raw_filter in raw.get("filters") or []:
                raw_filter = _mapping(raw_filter)
                values = {str(k): [str(x) for x in v] for k, v in _mapping(raw_filter.get("values")).items()}
                for key, vals in values.items():
                    declared = next((f for f in metric["filters"] if f["key"] == key), None)
                    if declared is None or not set(vals) <= set(declared["values"]) | {"__ALL_FILTER_VALUES__"}:
                        errors["filters.values"] = ["value_is_invalid"]
                charge_filters.append(
                    {
                        "invoice_display_name": raw_filter.get("invoice_display_name"),
                        "properties": dict(_mapping(raw_filter.get("properties"))),
                        "values": values,
                    }
                )
            charges.append(
                {
                    "lago_id": self._uuid(),
                    "billable_metric_id": metric["lago_id"],
                    "billable_metric_code": metric["code"],
                    "code": raw.get("code"),
                    "invoice_display_name": raw.get("invoice_display_name"),
                    "charge_model": model,
                    "pay_in_advance": bool(raw.get("pay_in_advance", False)),
                    "invoiceable": bool(raw.get("invoiceable", True)),
                    "regroup_paid_fees": raw.get("regroup_paid_fees"),
                    "prorated": bool(raw.get("prorated", False)),
                    "min_amount_cents": int(raw.get("min_amount_cents") or 0),
                    "properties": properties,
                    "filters": charge_filters,
                }
            )
        return charges

    def create_plan(self, body: Any) -> JSON:
        params = _permit_strings(_mapping(_require_root(body, "plan")), PLAN_STRINGS)
        with self.lock:
            errors: dict[str, list[str]] = {}
            code = _str_or_none(params.get("code"))
            if not code:
                errors["code"] = ["value_is_mandatory"]
            elif code in self.plans:
                errors["code"] = ["value_already_exist"]
            if not params.get("name"):
                errors["name"] = ["value_is_mandatory"]
            interval = params.get("interval")
            if interval not in INTERVALS:
                errors["interval"] = ["value_is_invalid"]
            amount = params.get("amount_cents", 0)
            if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
                errors["amount_cents"] = ["value_is_invalid"]
            currency = params.get("amount_currency") or "USD"
            if not _valid_currency(currency):
                errors["amount_currency"] = ["value_is_invalid"]
            charges = self._build_charges(params.get("charges"), errors)
            entitlements: dict[str, dict[str, Any]] = {}
            if params.get("entitlements"):
                entitlements = self._check_entitlements(params["entitlements"])
            if errors:
                raise validation_error(errors)
            assert code is not None
            now = iso(self.now())
            for charge in charges:
                charge["created_at"] = now
            plan: JSON = {
                "lago_id": self._uuid(),
                "code": code,
                "name": str(params["name"]),
                "invoice_display_name": params.get("invoice_display_name"),
                "description": params.get("description"),
                "interval": interval,
                "amount_cents": amount,
                "amount_currency": currency,
                "trial_period": params.get("trial_period") or 0.0,
                "pay_in_advance": bool(params.get("pay_in_advance", False)),
                "bill_charges_monthly": params.get("bill_charges_monthly"),
                "bill_fixed_charges_monthly": params.get("bill_fixed_charges_monthly"),
                "charges": charges,
                "entitlements": entitlements,
                "metadata": dict(_mapping(params.get("metadata"))),
                "created_at": now,
                "updated_at": now,
            }
            self.plans[code] = plan
            self._plans_by_id[plan["lago_id"]] = plan
            result = self._serialize_plan(plan)
            self._emit("plan.created", "plan", result)
            return {"plan": result}

    def _serialize_charge(self, charge: JSON) -> JSON:
        data = {k: copy.deepcopy(v) for k, v in charge.items() if k != "billable_metric_id"}
        data["lago_billable_metric_id"] = charge["billable_metric_id"]
        data["taxes"] = []
        data["applied_pricing_unit"] = None
        data["lago_parent_id"] = None
        return data

    def _serialize_plan(self, plan: JSON) -> JSON:
        data: JSON = {
            "lago_id": plan["lago_id"],
            "name": plan["name"],
            "invoice_display_name": plan["invoice_display_name"],
            "created_at": plan["created_at"],
            "code": plan["code"],
            "interval": plan["interval"],
            "description": plan["description"],
            "amount_cents": plan["amount_cents"],
            "amount_currency": plan["amount_currency"],
            "trial_period": plan["trial_period"],
            "pay_in_advance": plan["pay_in_advance"],
            "bill_charges_monthly": plan["bill_charges_monthly"],
            "bill_fixed_charges_monthly": plan["bill_fixed_charges_monthly"],
            "active_subscriptions_count": self._active_count(plan),
            "draft_invoices_count": 0,
            "minimum_commitment": None,
            "charges": [self._serialize_charge(c) for c in plan["charges"]],
            "fixed_charges": [],
            "taxes": [],
            "usage_thresholds": [],
            "entitlements": self._serialize_plan_entitlements(plan),
        }
        if plan["metadata"]:
            data["metadata"] = dict(plan["metadata"])
        return drop_none(data, "invoice_display_name", "description")

    def get_plan(self, code: str) -> JSON:
        with self.lock:
            self.refresh()  # (its active_subscriptions_count: the subscriptions started or ended by now)
            plan = self.plans.get(code)
            if plan is None:
                raise not_found("plan")
            return {"plan": self._serialize_plan(plan)}

    def list_plans(self, query: Mapping[str, Any]) -> JSON:
        with self.lock:
            self.refresh()
            items = sorted(self.plans.values(), key=lambda p: p["created_at"], reverse=True)
            return _page(items, "plans", query, self._serialize_plan)

    def update_plan(self, code: str, body: Any) -> JSON:
        """``PUT /plans/{code}`` (lago-api ``Plans::UpdateService``): only the keys given change. ``name``,
        ``invoice_display_name``, ``description``, ``amount_cents`` and ``charges`` always; ``code``, ``interval``,
        ``pay_in_advance``, ``amount_currency``, ``trial_period`` and ``bill_charges_monthly`` only while no
        subscription uses the plan. ``charges`` replaces the list: an item with the ``id`` of a charge updates it (its
        ``charge_model`` too, unless subscribed), one without is created, a charge left out is removed. The amount
        changing cancels downgrades it no longer is (``process_downgraded_subscriptions``/``process_pending_...``).
        ``bill_charges_monthly`` is written only when given, and holds only on a yearly or semiannual plan (the spec's
        PlanUpdateInput); changing the interval to another one nulls it."""
        params = _permit_strings(_mapping(_require_root(body, "plan")), PLAN_STRINGS)
        with self.lock:
            self.refresh()
            plan = self.plans.get(code)
            if plan is None:
                raise not_found("plan")
            attached = bool(self._plan_subs(plan))
            errors: dict[str, list[str]] = {}
            if "name" in params and not params["name"]:
                errors["name"] = ["value_is_mandatory"]
            amount = params.get("amount_cents", plan["amount_cents"])
            if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
                errors["amount_cents"] = ["value_is_invalid"]
            editable = {k: params[k] for k in PLAN_LOCKED_WHEN_SUBSCRIBED if k in params and not attached}
            new_code = _str_or_none(editable.get("code")) if "code" in editable else code
            if not new_code:
                errors["code"] = ["value_is_mandatory"]
            elif new_code != code and new_code in self.plans:
                errors["code"] = ["value_already_exist"]
            if "interval" in editable and editable["interval"] not in INTERVALS:
                errors["interval"] = ["value_is_invalid"]
            if "amount_currency" in editable and not _valid_currency(editable["amount_currency"]):
                errors["amount_currency"] = ["value_is_invalid"]
            charges: list[JSON] | None = None
            if params.get("charges") is not None:
                charges = self._merge_charges(plan, params["charges"], errors, attached=attached)
            if errors:
                raise validation_error(errors)
            assert new_code is not None
            old_amount = plan["amount_cents"]
            for key in ("name", "invoice_display_name", "description"):
                if key in params:
                    plan[key] = params[key]
            plan["amount_cents"] = amount
            for key in ("interval", "amount_currency", "trial_period"):
                if key in editable:
                    plan[key] = editable[key]
            if "pay_in_advance" in editable:
                plan["pay_in_advance"] = bool(editable["pay_in_advance"])
            allows_monthly_charges = plan["interval"] in MONTHLY_CHARGES_INTERVALS
            if "bill_charges_monthly" in editable:
                flag = editable["bill_charges_monthly"]
                plan["bill_charges_monthly"] = bool(flag) if allows_monthly_charges else None
            elif "interval" in editable and not allows_monthly_charges:
                plan["bill_charges_monthly"] = None
            if charges is not None:
                plan["charges"] = charges
            if new_code != code:
                del self.plans[code]
                self.plans[new_code] = plan
                plan["code"] = new_code
            if amount != old_amount:
                self._drop_stale_downgrades(plan)
            plan["updated_at"] = iso(self.now())
            result = self._serialize_plan(plan)
            self._emit("plan.updated", "plan", result)
            return {"plan": result}

    def _merge_charges(self, plan: JSON, raw: Any, errors: dict[str, list[str]], *, attached: bool) -> list[JSON]:
        existing = {c["lago_id"]: c for c in plan["charges"]}
        built = self._build_charges(raw, errors)
        if errors or not isinstance(raw, list):
            return []
        merged: list[JSON] = []
        now = iso(self.now())
        for item, charge in zip((_mapping(i) for i in raw), built, strict=True):
            old = existing.get(str(item.get("id")))
            if old is None:
                charge["created_at"] = now
                merged.append(charge)
                continue
            charge.update(lago_id=old["lago_id"], created_at=old["created_at"])
            if attached:  # the charge model, metric and options of a subscribed plan's charges stay
                for key in ("billable_metric_id", "billable_metric_code", "charge_model", "pay_in_advance", "prorated"):
                    charge[key] = old[key]
            merged.append(charge)
        return merged

    def _drop_stale_downgrades(self, plan: JSON) -> None:
        """Cancel the pending downgrades the plan's new amount makes pointless: lago-api ``Plans::UpdateService``
        (``process_downgraded_subscriptions``/``process_pending_subscriptions``) calls ``mark_as_canceled!`` on them,
        which sends no webhook."""
        for sub in self.subscriptions:
            if sub["status"] != "pending" or not sub.get("previous_subscription_id"):
                continue
            previous = self._find_sub_by_id(sub["previous_subscription_id"])
            if previous is None or previous["status"] != "active":
                continue
            from_plan, to_plan = self._plan_of(previous), self._plan_of(sub)
            if (plan is from_plan and from_plan["amount_cents"] < to_plan["amount_cents"]) or (
                plan is to_plan and to_plan["amount_cents"] > from_plan["amount_cents"]
            ):
                self._mark_as_canceled(sub, self.now())

    def _mark_as_canceled(self, sub: JSON, at: datetime) -> None:
        """lago-api ``Subscription#mark_as_canceled!``: the status and ``canceled_at`` only, no webhook (unlike
        ``Subscriptions::TerminateService`` on a pending subscription, see ``_cancel``)."""
        sub["status"] = "canceled"
        sub["canceled_at"] = sub.get("canceled_at") or iso(at)
        self._file_under_plan(sub)
        previous = self._find_sub_by_id(sub.get("previous_subscription_id"))
        if previous is not None and previous.get("next_subscription_id") == sub["lago_id"]:
            previous["next_subscription_id"] = None
        self._candidates_stale = True

    def delete_plan(self, code: str) -> JSON:
        """``DELETE /plans/{code}`` (lago-api ``Plans::PrepareDestroyService`` then ``Plans::DestroyService``): active
        subscriptions of the plan are terminated (invoiced per their ``on_termination_invoice``), pending ones
        canceled with ``mark_as_canceled!`` (no webhook); the code can then be used again. Answers the plan as it
        was, and sends ``plan.deleted``."""
        with self.lock:
            self.refresh()
            plan = self.plans.get(code)
            if plan is None:
                raise not_found("plan")
            now = self.now()
            # (Plans::DestroyJob destroys the plan's children first: the override plans of plan_overrides)
            children = [p for p in self._plans_by_id.values() if p.get("parent_id") == plan["lago_id"]]
            ids = {plan["lago_id"], *(child["lago_id"] for child in children)}
            for sub in list(self.subscriptions):
                if sub["plan_id"] not in ids:
                    continue
                if sub["status"] == "active":
                    self._terminate(sub, now, generate_invoice=sub["on_termination_invoice"] == "generate")
                elif sub["status"] == "pending":
                    self._mark_as_canceled(sub, now)
            self._candidates_stale = True
            result = self._serialize_plan(plan)
            del self.plans[code]
            for deleted in (*children, plan):
                deleted.setdefault("deleted_at", iso(now))
            self._emit("plan.deleted", "plan", result)
            return {"plan": result}

    # Subscriptions -----------------------------------------------------------------------------

    def _plan_of(self, sub: JSON) -> JSON:
        return self._plans_by_id[sub["plan_id"]]

    def _find_sub_by_id(self, lago_id: Any) -> JSON | None:
        if lago_id is None:
            return None
        return self._subscription_by_id.get(lago_id)

    def _subs(self, external_id: str, status: str) -> list[JSON]:
        return [s for s in self._subs_by_external.records(external_id) if s["status"] == status]

    def _first_active(self, external_id: str) -> JSON | None:
        """The first active subscription with that external id (the one an event is attributed to)."""
        return next((s for s in self._subs_by_external.records(external_id) if s["status"] == "active"), None)

    def _file_under_plan(self, sub: JSON) -> None:
        """Index ``sub`` under its plan, and count it among the plan's active subscriptions while it is one (call it
        whenever its ``plan_id`` or its ``status`` changes: see ``_plan_subs`` and ``_active_count``)."""
        lago_id = sub["lago_id"]
        self._subs_by_plan.setdefault(sub["plan_id"], {})[lago_id] = sub
        before = self._active_on_plan.get(lago_id)
        after = sub["plan_id"] if sub["status"] == "active" else None
        if before != after:
            if before is not None:
                self._active_by_plan[before].discard(lago_id)
            if after is not None:
                self._active_by_plan.setdefault(after, set()).add(lago_id)
            self._active_on_plan[lago_id] = after

    def _active_count(self, plan: JSON) -> int:
        """The number of active subscriptions on ``plan`` (its ``active_subscriptions_count``)."""
        return len(self._active_by_plan.get(plan["lago_id"], ()))

    def _plan_subs(self, plan: JSON) -> list[JSON]:
        """The subscriptions on ``plan`` now (filed under each plan they had: those that left it are skipped)."""
        lago_id = plan["lago_id"]
        return [s for s in self._subs_by_plan.get(lago_id, {}).values() if s["plan_id"] == lago_id]

    def _sub_for(self, external_id: str, status: str) -> JSON:
        matches = self._subs(external_id, status)
        if not matches:
            raise not_found("subscription")
        return max(matches, key=lambda s: (s["terminated_at"] or s["canceled_at"] or "", s["seq"]))

    def _period_bounds(self, sub: JSON, at: datetime | None = None) -> tuple[datetime, datetime]:
        """The billing period containing ``at`` (default now), in the customer's time zone (see billing_period)."""
        plan = self._plan_of(sub)
        anchor = parse_datetime(sub["subscription_at"]) or self.now()
        return billing_period(plan["interval"], sub["billing_time"], anchor, at or self.now(), self._timezone(sub))

    def _charges_bounds(self, sub: JSON, at: datetime | None = None) -> tuple[datetime, datetime]:
        """The charges period containing ``at``, starting no earlier than the exact ``started_at``: lago-api's
        ``DatesService#charges_from_datetime`` (``datetime = subscription.started_at if datetime <
        subscription.started_at``), so after an upgrade at noon the new subscription does not count the morning's
        events, billed with the old plan. A yearly or semiannual plan with ``bill_charges_monthly`` has monthly
        charges periods (``Yearly/SemiannualService#compute_charges_from_date/_to_date`` delegate to
        ``MonthlyService``). Both ``current_billing_period_*`` and current usage use these bounds."""
        start, end = self._full_charges_bounds(sub, at)
        # (exact: an upgrade in the second of the old plan's last calls leaves them to the old subscription)
        started = parse_datetime(sub.get("_started_exact") or sub["started_at"])
        if started is not None and started > start:
            start = started
        return start, end

    def _full_charges_bounds(self, sub: JSON, at: datetime | None = None) -> tuple[datetime, datetime]:
        """The whole charges period containing ``at`` (a first one not cut at ``started_at``), whose days are
        lago-api's ``charges_duration``."""
        plan = self._plan_of(sub)
        if plan["bill_charges_monthly"] and plan["interval"] in MONTHLY_CHARGES_INTERVALS:
            anchor = parse_datetime(sub["subscription_at"]) or self.now()
            return billing_period("monthly", sub["billing_time"], anchor, at or self.now(), self._timezone(sub))
        return self._period_bounds(sub, at)

    def _period_end(self, sub: JSON) -> datetime:
        """End of the current billing period (last second)."""
        return self._period_bounds(sub)[1]

    def _yearly_amount(self, plan: JSON) -> int:
        return int(plan["amount_cents"]) * YEARLY_FACTOR.get(plan["interval"], 12)

    def _serialize_sub(self, sub: JSON, *, extended: bool = False) -> JSON:
        plan = self._plan_of(sub)
        previous = self._find_sub_by_id(sub.get("previous_subscription_id"))
        nxt = self._find_sub_by_id(sub.get("next_subscription_id"))
        if nxt is not None and nxt["status"] != "pending" and sub["status"] == "active":
            nxt = None
        period_start: str | None = None
        period_end: str | None = None
        downgrade_date: str | None = None
        if sub["status"] == "active":
            start, end = self._charges_bounds(sub)
            period_start, period_end = iso(start), iso(end)
            if nxt is not None and nxt.get("switch_at") is not None:
                # Subscription#downgrade_plan_date: next_end_of_period.to_date + 1.day, the UTC date of the local
                # end of the period plus a day (so 2 April for a New York customer whose March ends 04:00Z on 1 April)
                downgrade_date = (self._period_end(sub).date() + timedelta(days=1)).isoformat()
        data: JSON = {
            "lago_id": sub["lago_id"],
            "external_id": sub["external_id"],
            "lago_customer_id": sub["customer_id"],
            "external_customer_id": sub["external_customer_id"],
            "billing_entity_code": BILLING_ENTITY_CODE,
            "name": sub["name"],
            "plan_code": plan["code"],
            "plan_amount_cents": plan["amount_cents"],
            "plan_amount_currency": plan["amount_currency"],
            "status": sub["status"],
            "billing_time": sub["billing_time"],
            "subscription_at": sub["subscription_at"],
            "started_at": sub["started_at"],
            "trial_ended_at": self._trial_ended_at(sub),
            "ending_at": sub["ending_at"],
            "terminated_at": sub["terminated_at"],
            "canceled_at": sub["canceled_at"],
            "created_at": sub["created_at"],
            "previous_plan_code": previous["plan_code"] if previous else None,
            "next_plan_code": nxt["plan_code"] if nxt else None,
            "downgrade_plan_date": downgrade_date,
            "current_billing_period_started_at": period_start,
            "current_billing_period_ending_at": period_end,
            "on_termination_credit_note": sub["on_termination_credit_note"],
            "on_termination_invoice": sub["on_termination_invoice"],
            "consolidate_invoice": sub["consolidate_invoice"],
            "payment_method": {"payment_method_type": "provider"},
            "activation_rules": [],
            "activated_at": sub["started_at"],
            "cancellation_reason": None,
            "purchase_order_number": sub["purchase_order_number"],
            "progressive_billing_disabled": sub["progressive_billing_disabled"],
            "applied_invoice_custom_sections": [],
        }
        if extended:
            data["plan"] = self._serialize_plan(plan)
            data["entitlements"] = self._serialize_sub_entitlements(sub)
            data["applicable_usage_thresholds"] = []
        return data

    def _trial_ended_at(self, sub: JSON) -> str | None:
        """``trial_ended_at``: the trial's end once it is over (lago-api ``Subscriptions::FreeTrialBillingService``
        sets it to ``trial_end_datetime``), null before or without a trial."""
        if sub["status"] == "pending":
            return None
        trial_end = self._trial_end(sub)
        if trial_end is None:
            return None
        over_at = parse_datetime(sub["terminated_at"]) or self.now()
        return iso(trial_end) if trial_end <= over_at else None

    def _emit_sub(self, webhook_type: str, sub: JSON) -> None:
        """Send a subscription webhook: Lago serializes the subscription with its plan and its customer (lago-api
        ``Webhooks::Subscriptions::*Service``, ``includes: %i[plan customer]``; the spec's
        ``SubscriptionWithCustomerObject``), and the entitlements."""
        data = self._serialize_sub(sub, extended=True)
        customer = self._customer_by_id(sub["customer_id"])
        if customer is not None:
            data["customer"] = self._serialize_customer(customer)
        self._emit(webhook_type, "subscription", data)

    def _new_sub(self, customer: JSON, plan: JSON, params: Mapping[str, Any], external_id: str) -> JSON:
        now = self.now()
        seq = self._next("subscription")
        sub: JSON = {
            "seq": seq,
            "lago_id": self._uuid(),
            "external_id": external_id,
            "customer_id": customer["lago_id"],
            "external_customer_id": customer["external_id"],
            "plan_code": plan["code"],
            "plan_id": plan["lago_id"],
            "name": params.get("name"),
            "status": "pending",
            "billing_time": params.get("billing_time") or "calendar",
            "subscription_at": iso(parse_datetime(params.get("subscription_at")) or now),
            "started_at": None,
            "ending_at": iso(parse_datetime(params.get("ending_at"))),
            "terminated_at": None,
            "canceled_at": None,
            "created_at": iso(now),
            "previous_subscription_id": None,
            "next_subscription_id": None,
            "switch_at": None,
            "on_termination_credit_note": params.get("on_termination_credit_note"),
            "on_termination_invoice": params.get("on_termination_invoice") or "generate",
            "consolidate_invoice": bool(params.get("consolidate_invoice", False)),
            "purchase_order_number": params.get("purchase_order_number"),
            "progressive_billing_disabled": bool(params.get("progressive_billing_disabled", False)),
            "entitlement_overrides": {},
            # feature code -> None (the whole feature removed) or the privilege codes removed for this subscription
            "entitlement_removals": {},
        }
        self.subscriptions.append(sub)
        self._subscription_by_id[sub["lago_id"]] = sub
        self._file_under_plan(sub)
        return sub

    def _activate(self, sub: JSON, at: datetime, *, bill: bool = True) -> None:
        """Start ``sub`` at ``at`` (``subscription.started``); a plan paid in advance out of its trial is billed then
        (``bill``: not for an upgrade, whose invoice bills it with the replaced subscription)."""
        sub["status"] = "active"
        sub["started_at"] = iso(at)
        # (the exact time, as Lago stores it to the microsecond: the charges period's start, see _charges_bounds)
        sub["_started_exact"] = at.isoformat()
        self._file_under_plan(sub)
        self._touch(sub)
        key = (sub["customer_id"], sub["external_id"])
        first = self._first_started.get(key)
        if first is None or at < first:
            self._first_started[key] = at
        elif first < at:
            sub["trial_from"] = iso(first)  # (Subscription#initial_started_at: see _trial_end)
        # a subscription backdated at its creation is billed from the period it was created in (the biller job
        # does not go back to the periods before)
        created = parse_datetime(sub.get("created_at"))
        self._schedule_close(sub, max(at, created) if created is not None else at)
        self._emit_sub("subscription.started", sub)
        if self._trial_end(sub) is not None:
            self._trials.append(sub)
        billed_at = max(at, created) if created is not None else at
        if bill and self._bills_in_advance_at(sub, billed_at):
            self._bill_start(sub, billed_at)

    def _cancel(self, sub: JSON, at: datetime) -> None:
        sub["status"] = "canceled"
        sub["canceled_at"] = iso(at)
        self._file_under_plan(sub)
        previous = self._find_sub_by_id(sub.get("previous_subscription_id"))
        if previous is not None and previous.get("next_subscription_id") == sub["lago_id"]:
            previous["next_subscription_id"] = None
        self._emit_sub("subscription.terminated", sub)
        if previous is not None and previous["status"] == "active":
            self._emit_sub("subscription.updated", previous)

    def _terminate(
        self,
        sub: JSON,
        at: datetime,
        *,
        generate_invoice: bool,
        cancel_next: bool = True,
        credit_unused: bool = True,
        upgrade: bool = False,
    ) -> None:
        """lago-api ``Subscriptions::TerminateService``: terminated at ``at``; a pay-in-advance plan's unused days
        credited (``credit_unused``, see ``_credit_unused_days``: not for a downgrade's switch; for an ``upgrade``
        from the upgrade's day on, credit only); its pending next subscription canceled (``cancel_next``); the
        termination invoice issued (``generate_invoice``: its ``on_termination_invoice``)."""
        sub["status"] = "terminated"
        sub["terminated_at"] = iso(at)
        sub["_terminated_exact"] = at.isoformat()  # (its usage's end: see _usage_for)
        self._file_under_plan(sub)
        if credit_unused:
            self._credit_unused_days(sub, at, upgrade=upgrade)
        nxt = self._find_sub_by_id(sub.get("next_subscription_id"))
        if cancel_next and nxt is not None and nxt["status"] == "pending":
            nxt["status"] = "canceled"
            nxt["canceled_at"] = iso(at)
            self._file_under_plan(nxt)
            sub["next_subscription_id"] = None
        self._emit_sub("subscription.terminated", sub)
        if generate_invoice:
            self._bill_terminated(sub, at)

    def _last_subscription_fee(self, sub: JSON) -> tuple[JSON, JSON] | None:
        """The invoice and fee of the subscription's last plan fee (``subscription.fees.subscription.order(created_at:
        :desc).first``), or None."""
        # (a subscription's invoices are its customer's)
        for invoice in reversed(self._invoices_by_customer.records(sub["customer_id"])):
            if sub["lago_id"] not in invoice["subscription_ids"]:
                continue
            for fee in invoice["fees"]:
                if fee["item"]["type"] == "subscription" and fee["lago_subscription_id"] == sub["lago_id"]:
                    return invoice, fee
        return None

    def _credit_unused_days(self, sub: JSON, at: datetime, *, upgrade: bool = False) -> None:
        """The credit note of a pay-in-advance plan terminated at ``at`` before the end of the period it paid (lago-api
        ``Subscriptions::TerminateService``, ``CreditNotes::CreateFromTermination``; reason ``order_cancellation``),
        on the invoice of its last plan fee, when that fee paid the period holding ``at``
        (``pay_in_advance_invoice_issued?``). Its amount: the unused days, from the (UTC date of the) end of the
        termination's local day to the period's end, times ``plan amount / period days`` (a float, as Ruby's
        ``fdiv``), truncated to 5 decimals, then rounded; less what credit notes already took from the fee. Per the
        subscription's ``on_termination_credit_note``: ``credit`` (the default) credits it all; ``refund`` refunds
        what was paid of it (the fee's share of ``total_paid_amount_cents`` less the used days' price, at most the
        amount) and credits the rest; ``offset`` refunds as much and offsets the rest against the invoice (its
        ``total_due_amount_cents`` shrinks); ``skip``: none. An ``upgrade`` (``TerminateService`` with ``upgrade:
        true``) counts the unused days from the upgrade's day (``billed_from -= 1.day``: the new plan pays that day)
        and credits them all (``refund: !upgrade && ...``). Not emulated: taxes and coupons' share."""
        choice = sub.get("on_termination_credit_note") or "credit"
        if choice == "skip" or not self._plan_of(sub)["pay_in_advance"]:
            return
        if upgrade:
            choice = "credit"
        found = self._last_subscription_fee(sub)
        if found is None:
            return
        invoice, fee = found
        fee_amount = int(fee["amount_cents"])
        start, end = self._period_bounds(sub, at)
        if fee_amount <= 0 or invoice.get("status") == "voided" or fee.get("to_date") != iso(end):
            return
        details: Mapping[str, Any] = fee.get("amount_details") or {}
        plan_amount = int(details.get("plan_amount_cents", self._plan_of(sub)["amount_cents"]))
        tz = self._timezone(sub)
        duration = _period_days(start, end)
        day_price = plan_amount / duration
        period_end = end.astimezone(UTC).date()
        end_of_day = local_day_start(self._local_date(sub, at) + timedelta(days=1), tz) - timedelta(seconds=1)
        terminated_day = end_of_day.astimezone(UTC).date()
        trial_end = self._trial_end(sub)
        trial_day = trial_end.astimezone(UTC).date() if trial_end is not None else None
        billed_from = terminated_day - timedelta(days=1) if upgrade else terminated_day
        if trial_day is not None and trial_day >= billed_from:
            billed_from = period_end if trial_day > period_end else trial_day - timedelta(days=1)
        amount = day_price * max((period_end - billed_from).days, 0)
        if amount <= 0:
            return
        amount = min(amount, float(fee_amount))
        amount -= sum(
            int(item["amount_cents"])
            for note in self._notes_by_customer.records(invoice["customer_id"])  # (an invoice's notes: its customer's)
            if note["lago_invoice_id"] == invoice["lago_id"] and note.get("credit_status") != "voided"
            for item in note.get("items") or []
            if item.get("fee", {}).get("lago_id") == fee["lago_id"]
        )
        if amount <= 0:
            return
        precise = Decimal(amount).quantize(Decimal("0.00001"), rounding=ROUND_DOWN)
        total = int(precise.to_integral_value(rounding=ROUND_HALF_UP))
        if total <= 0:
            return
        refund = 0
        if choice in ("refund", "offset"):
            invoice_total = int(invoice.get("sub_total_including_taxes_amount_cents") or 0)
            paid = int(invoice.get("total_paid_amount_cents") or 0)
            paid_share = fee_amount / invoice_total * paid if invoice_total else 0.0
            used_from = self._billed_from(sub, start).astimezone(UTC).date()
            if trial_day is not None and trial_day > used_from:
                used_from = trial_day
            used_days = max((min(terminated_day, period_end) - used_from).days + 1, 0)
            used = Decimal(day_price * used_days).quantize(Decimal("0.00001"), rounding=ROUND_DOWN)
            potential = Decimal(paid_share) - used.to_integral_value(rounding=ROUND_HALF_UP)
            if potential > 0:
                refund = int(min(potential, Decimal(total)).to_integral_value(rounding=ROUND_HALF_UP))
        rest = total - refund
        credit, offset = (0, rest) if choice == "offset" else (rest, 0)
        item = {
            "lago_id": self._uuid(),
            "amount_cents": total,
            "amount_currency": invoice.get("currency") or "USD",
            "fee": copy.deepcopy(fee),
        }
        note = self._credit_note_record(
            invoice,
            {
                "credit_amount_cents": credit,
                "refund_amount_cents": refund,
                "offset_amount_cents": offset,
                "credit_status": "available",
                "reason": "order_cancellation",
                "issuing_date": self._local_date(sub, at).isoformat(),
                "created_at": iso(at),
                "updated_at": iso(at),
                "items": [item],
            },
        )
        if offset:
            invoice["total_due_amount_cents"] = max(int(invoice["total_due_amount_cents"]) - offset, 0)
        self.credit_notes.append(note)
        self._emit("credit_note.created", "credit_note", self._serialize_credit_note(note))

    def _bill_terminated(self, sub: JSON, at: datetime, *, upgraded_to: JSON | None = None) -> None:
        """The invoice of a subscription terminated at ``at``: its usage up to ``terminated_at`` (an event timestamped
        later in the period is not billed), plus, when paid in arrears, the plan's fee for the days used (see
        ``_terminated_plan_fee``); sends ``invoice.created``. An upgrade (``upgraded_to``: the new subscription) bills
        on the same invoice the new plan's first period when it is paid in advance and not in a trial (lago-api
        ``PlanUpgradeService#billable_subscriptions``: one ``BillSubscriptionJob`` for both)."""
        customer = self._customer_by_id(sub["customer_id"])
        if customer is None:
            return
        close = parse_datetime(sub.get("next_close"))
        started = parse_datetime(sub.get("started_at"))
        if (
            upgraded_to is None
            and close is not None
            and close <= at < close + timedelta(days=1)
            and (started is None or at - timedelta(days=1) >= started)
        ):
            # terminated on the day after a period the biller has not billed yet (at its boundary, or before the
            # biller's run): CreateInvoiceSubscriptionService#termination_boundaries bills that period instead, as if
            # not terminated, with no fee of a plan paid in advance (its next period is not due)
            self._bill_period(sub, close, issued_at=at, advance=False)
            return
        usage = self._usage_for(sub, at, charges=self._invoiced_charges(sub))
        plan = self._plan_of(sub)
        true_ups = self._true_up_amounts(sub, usage, at, at)
        plan_period: tuple[datetime, datetime] | None = None
        plan_fee = 0
        if not plan["pay_in_advance"]:
            # Fees::SubscriptionService#terminated_amount: the days used up to the termination, rounded up
            start, end = self._period_bounds(sub, at)
            plan_fee = self._terminated_plan_fee(sub, start, end, at)
            plan_period = (self._billed_from(sub, start), at)
        new_period: tuple[datetime, datetime] | None = None
        new_fee = 0
        if upgraded_to is not None and self._bills_in_advance_at(upgraded_to, at):
            new_period = self._period_bounds(upgraded_to, at)
            new_fee = self._plan_fee(upgraded_to, *new_period, first=True)
        amount = int(usage["amount_cents"]) + sum(true_ups.values()) + plan_fee + new_fee
        invoice = self._new_invoice(
            customer,
            {
                "invoice_type": "subscription",
                "currency": plan["amount_currency"],
                "fees_amount_cents": amount,
                "total_amount_cents": amount,
            },
            subscription=sub,
        )
        invoice["invoice_subscriptions"] = [self._invoice_subscription(sub, usage, at)]
        invoice["fees"] = self._invoice_fees(invoice, sub, usage, true_ups, plan_period, plan_fee)
        if upgraded_to is not None and new_period is not None:
            invoice["subscription_ids"].append(upgraded_to["lago_id"])
            billed = (self._billed_from(upgraded_to, new_period[0]), new_period[1])
            invoice["fees"].append(self._subscription_fee(invoice, upgraded_to, billed, new_fee))
        self._settle_invoice(invoice)
        self._issue(invoice)

    def _bills_in_advance_at(self, sub: JSON, at: datetime) -> bool:
        """Whether a subscription starting at ``at`` is billed then: a plan paid in advance, out of its trial
        (lago-api ``ActivateService`` / ``PlanUpgradeService``: ``pay_in_advance? && !in_trial_period?``; a trial's
        plan is billed when the trial ends, see ``_end_trials``)."""
        if not self._plan_of(sub)["pay_in_advance"]:
            return False
        trial_end = self._trial_end(sub)
        return trial_end is None or trial_end <= at

    # Credits deducted from an invoice (lago-api Invoices::CalculateFeesService, after the fees) -------------------

    def _settle_invoice(self, invoice: JSON) -> None:
        """Deduct from a new subscription invoice what the customer holds, in lago-api's order
        (``Invoices::CalculateFeesService#call``): its applied coupons before taxes (``_apply_coupons``), then its
        credit notes (``_apply_credit_notes``), then its wallets (``_apply_wallets``); no taxes are emulated. Then
        ``payment_status`` is ``succeeded`` when nothing is left to pay, else ``pending``."""
        invoice["credits"] = []
        fees_amount = int(invoice["fees_amount_cents"])
        invoice["sub_total_excluding_taxes_amount_cents"] = fees_amount
        if fees_amount > 0:
            self._apply_coupons(invoice)
        subtotal = int(invoice["sub_total_excluding_taxes_amount_cents"])
        invoice["sub_total_including_taxes_amount_cents"] = subtotal
        invoice["total_amount_cents"] = subtotal
        self._apply_credit_notes(invoice)
        if int(invoice["total_amount_cents"]) > 0:
            self._apply_wallets(invoice)
        total = int(invoice["total_amount_cents"])
        invoice["payment_status"] = "pending" if total > 0 else "succeeded"
        invoice["total_due_amount_cents"] = total
        invoice["total_paid_amount_cents"] = 0

    def _credit(self, invoice: JSON, amount: int, item: JSON, *, before_taxes: bool) -> None:
        """One ``credits`` line of an invoice (lago-api ``V1::CreditSerializer``; ``invoice.payment_status`` is
        filled in when serialized)."""
        invoice["credits"].append(
            {
                "lago_id": self._uuid(),
                "amount_cents": amount,
                "amount_currency": invoice["currency"],
                "before_taxes": before_taxes,
                "item": item,
            }
        )

    def _apply_coupons(self, invoice: JSON) -> None:
        """lago-api ``Credits::AppliedCouponsService`` / ``AppliedCouponService`` / ``AppliedCoupons::AmountService``:
        the customer's active coupons, oldest first, while the sub-total is positive; a fixed one only in its currency.
        A percentage takes ``rate`` % of the sub-total (rounded half up), a fixed one its amount (a ``once`` one what
        is left of it), at most the sub-total. A ``recurring`` one counts down ``frequency_duration_remaining``; a
        ``once`` one used up (a percentage one at its first use) or a ``recurring`` one at 0 is terminated."""
        now = iso(self.now())
        coupons = [c for c in self._coupons_by_customer.records(invoice["customer_id"]) if c["status"] == "active"]
        coupons.sort(key=lambda c: c["created_at"])
        for coupon in coupons:
            subtotal = int(invoice["sub_total_excluding_taxes_amount_cents"])
            if subtotal <= 0:
                break
            rate = to_decimal(coupon.get("percentage_rate")) if coupon.get("amount_cents") is None else None
            if rate is None and (coupon.get("amount_currency") or invoice["currency"]) != invoice["currency"]:
                continue
            frequency = coupon["frequency"]
            remaining = 0
            if rate is not None:
                discount = Decimal(subtotal) * rate / 100
                amount = subtotal if discount >= subtotal else cents(discount)
            else:
                fixed = int(coupon["amount_cents"] or 0)
                if frequency == "once":
                    left = coupon.get("amount_cents_remaining")
                    remaining = fixed if left is None else int(left)
                    amount = min(remaining, subtotal)
                else:
                    amount = min(fixed, subtotal)
            self._credit(
                invoice,
                amount,
                {
                    "lago_item_id": coupon["lago_coupon_id"],
                    "type": "coupon",
                    "code": coupon["coupon_code"],
                    "name": coupon.get("coupon_name") or coupon["coupon_code"],
                },
                before_taxes=True,
            )
            self._spread_coupon(invoice, amount, subtotal)
            invoice["coupons_amount_cents"] = int(invoice.get("coupons_amount_cents") or 0) + amount
            invoice["sub_total_excluding_taxes_amount_cents"] = subtotal - amount
            terminate = False
            if frequency == "once":
                if rate is None:
                    coupon["amount_cents_remaining"] = remaining - amount
                terminate = rate is not None or amount >= remaining
            elif frequency == "recurring":
                left_count = int(coupon.get("frequency_duration_remaining") or 0)
                coupon["frequency_duration_remaining"] = max(left_count - 1, 0)
                terminate = coupon["frequency_duration_remaining"] <= 0
            if terminate:
                coupon["status"] = "terminated"
                coupon["terminated_at"] = now

    @staticmethod
    def _spread_coupon(invoice: JSON, amount: int, base: int) -> None:
        """Each fee's share of a coupon, by its amount (lago-api ``Fee#compute_precise_credit_amount_cents``), at most
        the fee's amount: its ``precise_coupons_amount_cents`` and its sub-total without taxes."""
        if base <= 0:
            return
        for fee in invoice["fees"]:
            fee_amount = Decimal(int(fee["amount_cents"]))
            taken = Decimal(fee.get("precise_coupons_amount_cents") or "0")
            taken = min(taken + Decimal(amount) * (fee_amount - taken) / base, fee_amount)
            fee["precise_coupons_amount_cents"] = decimal_str(taken)
            fee["sub_total_excluding_taxes_amount_cents"] = cents(fee_amount - taken)
            fee["sub_total_excluding_taxes_precise_amount_cents"] = decimal_str(fee_amount - taken)

    def _apply_credit_notes(self, invoice: JSON) -> None:
        """lago-api ``Credits::CreditNoteService``: the customer's available credit notes of other invoices, oldest
        first, each taking at most what is left of the invoice from its ``balance_amount_cents`` (``consumed`` at
        0); the invoice's ``credit_notes_amount_cents`` grows and its total shrinks (credits after taxes)."""
        notes = [
            n
            for n in self._notes_by_customer.records(invoice["customer_id"])
            if n.get("credit_status") == "available"
            and int(n.get("balance_amount_cents") or 0) > 0
            and n["lago_invoice_id"] != invoice["lago_id"]
        ]
        notes.sort(key=lambda n: n["created_at"])
        now = iso(self.now())
        for note in notes:
            remaining = int(invoice["total_amount_cents"])
            if remaining <= 0:
                break
            amount = min(int(note["balance_amount_cents"]), remaining)
            self._credit(
                invoice,
                amount,
                {
                    "lago_item_id": note["lago_id"],
                    "type": "credit_note",
                    "code": note["number"],
                    "name": note.get("invoice_number") or note["number"],
                },
                before_taxes=False,
            )
            note["balance_amount_cents"] = int(note["balance_amount_cents"]) - amount
            if note["balance_amount_cents"] == 0:
                note["credit_status"] = "consumed"
            note["updated_at"] = now
            invoice["credit_notes_amount_cents"] = int(invoice.get("credit_notes_amount_cents") or 0) + amount
            invoice["total_amount_cents"] = remaining - amount

    def _apply_wallets(self, invoice: JSON) -> None:
        """lago-api ``Credits::AppliedPrepaidCreditsService``: the customer's active wallets in the invoice's currency
        with a balance, by ``priority`` then age, each paying at most its balance through an outbound, settled,
        ``invoiced`` wallet transaction (``wallet_transaction.created``); ``Wallets::Balance::DecreaseService`` takes
        the credits from the wallet (``wallet.updated``). The invoice's ``prepaid_credit_amount_cents`` grows and its
        total shrinks."""
        wallets = [
            w
            for w in self._wallets_by_customer.records(invoice["customer_id"])
            if w["status"] == "active" and w["currency"] == invoice["currency"] and int(w["balance_cents"]) > 0
        ]
        wallets.sort(key=lambda w: (int(w.get("priority") or 50), w["created_at"]))
        now = iso(self.now())
        for wallet in wallets:
            remaining = int(invoice["total_amount_cents"])
            if remaining <= 0:
                break
            amount = min(int(wallet["balance_cents"]), remaining)
            unit = subunits_per_unit(wallet["currency"])
            rate = to_decimal(wallet["rate_amount"]) or Decimal(1)
            credits_used = (Decimal(amount) / unit / rate).quantize(Decimal("0.00001"), rounding=ROUND_DOWN)
            credits_left = (to_decimal(wallet["credits_balance"]) or Decimal(0)) - credits_used
            consumed = (to_decimal(wallet.get("consumed_credits")) or Decimal(0)) + credits_used
            balance = int((credits_left * rate * unit).to_integral_value(rounding=ROUND_FLOOR))
            wallet.update(
                balance_cents=balance,
                balance=decimal_str(Decimal(balance) / unit),
                credits_balance=decimal_str(credits_left),
                consumed_credits=decimal_str(consumed),
                ongoing_balance_cents=balance,
                credits_ongoing_balance=decimal_str(credits_left),
                last_balance_sync_at=now,
                last_consumed_credit_at=now,
            )
            transaction: JSON = {
                "lago_id": self._uuid(),
                "lago_wallet_id": wallet["lago_id"],
                "lago_invoice_id": invoice["lago_id"],
                "lago_credit_note_id": None,
                "lago_voided_invoice_id": None,
                "status": "settled",
                "source": "manual",
                "transaction_status": "invoiced",
                "transaction_type": "outbound",
                "amount": decimal_str(Decimal(amount) / unit),
                "credit_amount": decimal_str(credits_used),
                "remaining_amount_cents": None,
                "remaining_credit_amount": None,
                "priority": int(wallet.get("priority") or 50),
                "invoice_requires_successful_payment": False,
                "settled_at": now,
                "failed_at": None,
                "created_at": now,
                "metadata": [],
                "name": None,
                "payment_method": {"payment_method_type": "provider"},
                "applied_invoice_custom_sections": [],
                "purchase_order_number": None,
            }
            self.wallet_transactions.append(transaction)
            invoice["prepaid_credit_amount_cents"] = int(invoice.get("prepaid_credit_amount_cents") or 0) + amount
            invoice["total_amount_cents"] = remaining - amount
            serialized = self._serialize_wallet(wallet)
            self._emit("wallet_transaction.created", "wallet_transaction", {**transaction, "wallet": serialized})
            self._emit("wallet.updated", "wallet", serialized)

    def create_subscription(self, body: Any) -> JSON:
        params = _permit_strings(_mapping(_require_root(body, "subscription")), SUBSCRIPTION_STRINGS)
        with self.lock:
            self.refresh()
            # Subscriptions::ValidateService#valid? stops at valid_plan? before any other check: an unknown plan is
            # 404 plan_not_found whatever else is wrong
            plan = self.plans.get(str(params.get("plan_code")))
            if plan is None:
                raise not_found("plan")
            errors: dict[str, list[str]] = {}
            external_customer_id = _str_or_none(params.get("external_customer_id"))
            external_id = _str_or_none(params.get("external_id"))
            if not external_customer_id:
                errors["external_customer_id"] = ["value_is_mandatory"]
            if not external_id:
                errors["external_id"] = ["value_is_mandatory"]
            if params.get("billing_time") not in (None, "calendar", "anniversary"):
                errors["billing_time"] = ["value_is_invalid"]
            for key in ("subscription_at", "ending_at"):
                if params.get(key) is not None and parse_datetime(params[key]) is None:
                    errors[key] = ["invalid_date"]
            _check_on_termination(params, errors)
            raw_overrides = params.get("plan_overrides")
            if raw_overrides is not None and not isinstance(raw_overrides, Mapping):
                errors["plan_overrides"] = ["invalid_format"]
            start_at = params.get("subscription_at") if parse_datetime(params.get("subscription_at")) else self.now()
            if "ending_at" not in errors and not self._valid_ending_at(params.get("ending_at"), start_at):
                errors["ending_at"] = ["invalid_date"]
            override: JSON | None = None
            if "plan_overrides" in params and "plan_overrides" not in errors:
                override = self._override_plan(plan, _mapping(raw_overrides), errors)
            if errors:
                raise validation_error(errors)
            assert external_customer_id and external_id
            customer = self._customer(external_customer_id)
            # CreateService: Customers::UpdateCurrencyService with the plan's currency (after plan_overrides), before
            # anything else is checked or written (a new customer has no currency yet: it takes the plan's)
            currency = (override or plan)["amount_currency"]
            if customer is not None and self._currency_refused(customer, currency, customer_update=False):
                raise validation_error({"currency": ["currencies_does_not_match"]})
            same_id = self._subs_by_external.records(external_id)
            for other in same_id:
                if other["status"] in ("active", "incomplete") and (
                    customer is None or other["customer_id"] != customer["lago_id"]
                ):
                    raise validation_error({"external_id": ["value_already_exist"]})
            if customer is None:
                customer = self._new_customer(external_customer_id)
            if customer["fields"].get("currency") != currency:  # (customer.update!: no webhook)
                customer["fields"]["currency"] = currency
                customer["updated_at"] = iso(self.now())
            current = next(
                (
                    s
                    for s in same_id
                    if s["customer_id"] == customer["lago_id"]
                    and (s["status"] == "active" or (s["status"] == "pending" and not s["previous_subscription_id"]))
                ),
                None,
            )
            now = self.now()
            # the plan the subscription gets: the override plan when plan_overrides were given (registered only once a
            # subscription uses it: the same plan as the current subscription's returns that one, overrides ignored)
            target = plan if override is None else self._register_override(override)
            if current is None:
                sub = self._new_sub(customer, target, params, external_id)
                start = parse_datetime(sub["subscription_at"])
                # CreateService#create_subscription: a subscription_at on today's date or before (in the customer's
                # time zone) is active at once, from that subscription_at, even one later today
                # (handle_today_subscription); a later day is pending (handle_future_subscription)
                if start is not None and self._local_date(sub, start) <= self._local_date(sub, now):
                    self._activate(sub, start)
                return {"subscription": self._serialize_sub(sub, extended=True)}
            if current["plan_id"] == plan["lago_id"]:
                if override is not None:
                    del self._plans_by_id[override["lago_id"]]
                return {"subscription": self._serialize_sub(current, extended=True)}
            if current["status"] == "pending":
                # PlanUpgradeService/PlanDowngradeService#update_pending_subscription on a subscription that has not
                # started: ``current_subscription.plan = plan`` (the plan itself: plan_overrides are not applied),
                # its name when one is given, and ``save!``: no webhook is sent
                if override is not None:
                    del self._plans_by_id[override["lago_id"]]
                current["plan_code"], current["plan_id"] = plan["code"], plan["lago_id"]
                name = str(params.get("name") or "").strip()
                if name:
                    current["name"] = name
                self._file_under_plan(current)
                self._touch(current)
                return {"subscription": self._serialize_sub(current, extended=True)}
            current_plan = self._plan_of(current)
            old_next = self._find_sub_by_id(current.get("next_subscription_id"))
            if old_next is not None and old_next["status"] == "pending":
                old_next["status"] = "canceled"
                old_next["canceled_at"] = iso(now)
                self._file_under_plan(old_next)
                current["next_subscription_id"] = None
            sub_params = dict(params)
            sub_params.setdefault("name", current["name"])
            sub_params["billing_time"] = current["billing_time"]
            sub_params["subscription_at"] = current["subscription_at"]
            sub_params.setdefault("ending_at", current["ending_at"])
            new = self._new_sub(customer, target, sub_params, external_id)
            new["previous_subscription_id"] = current["lago_id"]
            new["entitlement_overrides"] = {}
            # (create_service#upgrade? compares the plan with the overridden amount_cents)
            if self._yearly_amount(target) >= self._yearly_amount(current_plan):
                self._bill_pending_close(current, now)
                current["next_subscription_id"] = new["lago_id"]
                self._touch(current)
                self._terminate(current, now, generate_invoice=False, cancel_next=False, upgrade=True)
                self._activate(new, now, bill=False)
                # lago-api PlanUpgradeService#bill_subscriptions: the replaced subscription is billed at once,
                # whatever its on_termination_invoice, with the new plan's first period when paid in advance
                self._bill_terminated(current, now, upgraded_to=new)
                return {"subscription": self._serialize_sub(new, extended=True)}
            current["next_subscription_id"] = new["lago_id"]
            self._touch(current)
            new["switch_at"] = iso(self._period_end(current) + timedelta(seconds=1))
            self._emit_sub("subscription.updated", current)
            return {"subscription": self._serialize_sub(current, extended=True)}

    def _override_plan(self, plan: JSON, overrides: Mapping[str, Any], errors: dict[str, list[str]]) -> JSON:
        """lago-api ``Plans::OverrideService``: the plan of a subscription created with ``plan_overrides``, a copy of
        ``plan`` (same code, its own ``lago_id``, ``parent_id`` the plan's) with the given ``amount_cents``,
        ``amount_currency``, ``name``, ``invoice_display_name``, ``description`` and ``trial_period``, and a copy of
        each charge, those listed by ``id`` with their ``properties``, ``filters``, ``min_amount_cents`` and
        ``invoice_display_name``. It is not one of the plans (``GET /plans``); the subscription's entitlements stay
        the parent's (``SubscriptionEntitlement.for_subscription``). Validated here, stored by ``_register_override``.
        """
        child = copy.deepcopy(plan)
        amount = overrides.get("amount_cents", plan["amount_cents"])
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            errors["amount_cents"] = ["value_is_invalid"]
        currency = overrides.get("amount_currency", plan["amount_currency"])
        if not _valid_currency(currency):
            errors["amount_currency"] = ["value_is_invalid"]
        child.update(amount_cents=amount, amount_currency=currency)
        for key in ("name", "invoice_display_name", "description", "trial_period"):
            if key in overrides:
                child[key] = overrides[key]
        raw_charges = overrides.get("charges") or []
        if not isinstance(raw_charges, list):
            errors["charges"] = ["invalid_format"]
            raw_charges = []
        given = {str(c.get("id")): c for c in raw_charges if isinstance(c, Mapping)}
        copies: list[JSON] = []
        for charge in plan["charges"]:
            raw = {k: v for k, v in charge.items() if k not in ("lago_id", "created_at")}
            override = given.get(charge["lago_id"], {})
            for key in ("properties", "filters", "min_amount_cents", "invoice_display_name"):
                if key in override:
                    raw[key] = override[key]
            copies.append(raw)
        child["charges"] = self._build_charges(copies, errors)
        now = iso(self.now())
        for charge in child["charges"]:
            charge["created_at"] = now
        child.update(lago_id=self._uuid(), parent_id=plan["lago_id"], entitlements={}, created_at=now, updated_at=now)
        return child

    def _override_changes(self, child: JSON, overrides: Mapping[str, Any], errors: dict[str, list[str]]) -> JSON:
        """lago-api ``Plans::UpdateService`` on an override plan (``PUT /subscriptions/{id}`` with ``plan_overrides``
        when the subscription has one already): what a plan with subscriptions lets change, ``name``,
        ``invoice_display_name``, ``description``, ``amount_cents`` and ``charges`` (as ``PUT /plans/{code}`` does: the
        list replaces the override plan's charges, matched by *their* ids). Validated here; applied by the caller."""
        changes: JSON = {k: overrides[k] for k in ("name", "invoice_display_name", "description") if k in overrides}
        if "name" in overrides and not overrides["name"]:
            errors["name"] = ["value_is_mandatory"]
        if "amount_cents" in overrides:
            amount = overrides["amount_cents"]
            if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
                errors["amount_cents"] = ["value_is_invalid"]
            changes["amount_cents"] = amount
        if overrides.get("charges") is not None:
            changes["charges"] = self._merge_charges(child, overrides["charges"], errors, attached=True)
        return changes

    def _register_override(self, child: JSON) -> JSON:
        self._plans_by_id[child["lago_id"]] = child
        return child

    def _entitlements_plan(self, sub: JSON) -> JSON:
        """The plan whose entitlements a subscription has: its plan's parent for an override plan."""
        plan = self._plan_of(sub)
        parent = self._plans_by_id.get(plan["parent_id"]) if plan.get("parent_id") else None
        return parent if parent is not None else plan

    def _valid_ending_at(self, value: Any, subscription_at: Any) -> bool:
        """lago-api ``Subscriptions::ValidateService#valid_ending_at?`` (create and update): an ``ending_at`` must fall
        on a later *day* than today and than ``subscription_at`` (``ending_at.to_date > Time.current.to_date``), so
        one later today, or one in the past (say, to backfill a subscription that has ended), is ``invalid_date``.
        Both dates are read as written, in their own offset (``DateTime.iso8601(value).to_date``): an ``ending_at``
        of ``2026-03-16T01:00:00+05:00`` is on 16 March, although it is 15 March 20:00 in UTC."""
        if value is None or value == "":
            return True
        ending = written_date(value)
        if ending is None:
            return False
        start = written_date(subscription_at) if subscription_at is not None else None
        return ending > self.now().astimezone(UTC).date() and (start is None or ending > start)

    def get_subscription(self, external_id: str, status: str | None) -> JSON:
        with self.lock:
            self.refresh()
            sub = self._sub_for(external_id, status or "active")
            return {"subscription": self._serialize_sub(sub, extended=True)}

    def list_subscriptions(
        self,
        query: Mapping[str, Any],
        statuses: Sequence[str],
        external_customer_id: str | None = None,
        multi: Mapping[str, list[str]] | None = None,
    ) -> JSON:
        """lago-api ``SubscriptionIndex`` + ``SubscriptionsQuery``: ``status[]`` defaults to ``["active"]``; a list
        naming an unknown status filters nothing (``valid_status?``); newest ``subscription_at`` first."""
        with self.lock:
            self.refresh()
            self._check_billing_entity_codes(multi or {})
            wanted = list(statuses) or ["active"]
            customer_filter = external_customer_id or query.get("external_customer_id")
            pool: list[JSON] = self.subscriptions
            if external_customer_id is not None:
                customer = self._customer(external_customer_id)
                if customer is None:
                    raise not_found("customer")
                pool = self._subs_by_customer.records(customer["lago_id"])
            elif customer_filter:
                pool = self._subs_by_external_customer.records(customer_filter)
            if all(status in SUBSCRIPTION_STATUSES for status in wanted):
                items = [s for s in pool if s["status"] in wanted]
            else:
                items = list(pool)
            if query.get("plan_code"):
                listed_plan = self.plans.get(str(query["plan_code"]))
                # (an override plan has its parent's code: SubscriptionsQuery filters on plans.code)
                items = [
                    s
                    for s in items
                    if listed_plan is not None
                    and listed_plan["lago_id"] in (s["plan_id"], self._plan_of(s).get("parent_id"))
                ]
            if query.get("currency"):  # the plan's amount_currency
                items = [s for s in items if self._plan_of(s)["amount_currency"] == query["currency"]]
            # ORDER BY subscription_at DESC NULLS LAST, created_at DESC
            items = sorted(items, key=lambda s: (s["subscription_at"] or "", s["created_at"], s["seq"]), reverse=True)
            return _page(items, "subscriptions", query, self._serialize_sub)

    def update_subscription(self, external_id: str, status: str | None, body: Any) -> JSON:
        params = _permit_strings(_mapping(_require_root(body, "subscription")), SUBSCRIPTION_STRINGS)
        with self.lock:
            self.refresh()
            sub = self._sub_for(external_id, status or "active")
            errors: dict[str, list[str]] = {}
            if "subscription_at" in params:
                if sub["status"] != "pending" or parse_datetime(params["subscription_at"]) is None:
                    errors["subscription_at"] = ["invalid_date"]
            given_start = params.get("subscription_at")
            start = given_start if parse_datetime(given_start) is not None else sub["subscription_at"]
            if not self._valid_ending_at(params.get("ending_at"), start):
                errors["ending_at"] = ["invalid_date"]
            _check_on_termination(params, errors)
            # plan_overrides (UpdateService#handle_plan_override): a plan of its own made from the subscription's plan
            # (Plans::OverrideService), or, when it has one already, that plan updated (Plans::UpdateService)
            plan = self._plan_of(sub)
            override: JSON | None = None
            changes: JSON | None = None
            raw_overrides = params.get("plan_overrides")
            if raw_overrides is not None and not isinstance(raw_overrides, Mapping):
                errors["plan_overrides"] = ["invalid_format"]
            elif "plan_overrides" in params and plan.get("parent_id"):
                changes = self._override_changes(plan, _mapping(raw_overrides), errors)
            elif "plan_overrides" in params:
                override = self._override_plan(plan, _mapping(raw_overrides), errors)
            if errors:
                raise validation_error(errors)
            if override is not None:
                sub["plan_id"] = self._register_override(override)["lago_id"]
                self._file_under_plan(sub)
            elif changes is not None:
                old_amount = plan["amount_cents"]
                plan.update(changes, updated_at=iso(self.now()))
                if plan["amount_cents"] != old_amount:
                    self._drop_stale_downgrades(plan)
                self._emit("plan.updated", "plan", self._serialize_plan(plan))  # (UpdateService sends it, child or not)
            for key in SUBSCRIPTION_UPDATABLE:
                if key in params and (params[key] is not None or key in ("name", "purchase_order_number")):
                    sub[key] = params[key]
            if "ending_at" in params:
                sub["ending_at"] = iso(parse_datetime(params["ending_at"]))
                sub["ending_set_at"] = iso(self.now())  # (see _ending_run)
            if "subscription_at" in params:
                sub["subscription_at"] = iso(parse_datetime(params["subscription_at"]))
                # UpdateService#process_subscription_at_change: a time already past activates it from that time; one
                # later today leaves it to the next ActivateSubscriptionsJob run (now, within 5 minutes)
                moved = parse_datetime(sub["subscription_at"])
                now = self.now()
                if moved is not None and sub["status"] == "pending" and not sub.get("previous_subscription_id"):
                    if moved <= now:
                        self._activate(sub, moved)
                    elif self._local_date(sub, moved) <= self._local_date(sub, now):
                        self._activate(sub, now)
            self._touch(sub)
            self._emit_sub("subscription.updated", sub)
            self.refresh()
            return {"subscription": self._serialize_sub(sub, extended=True)}

    def terminate_subscription(self, external_id: str, query: Mapping[str, Any]) -> JSON:
        with self.lock:
            self.refresh()
            status = query.get("status") or "active"
            on_invoice = query.get("on_termination_invoice")
            on_credit = query.get("on_termination_credit_note")
            errors: dict[str, list[str]] = {}
            if on_invoice not in (None, "generate", "skip"):
                errors["on_termination_invoice"] = ["value_is_invalid"]
            if on_credit not in (None, "credit", "refund", "offset", "skip"):
                errors["on_termination_credit_note"] = ["value_is_invalid"]
            if errors:
                raise validation_error(errors)
            if status not in ("active", "pending", "incomplete"):
                raise not_found("subscription")
            sub = self._sub_for(external_id, status)
            if sub["status"] == "incomplete":
                raise validation_error({"base": ["subscription_incomplete"]})
            now = self.now()
            if on_invoice is not None:
                sub["on_termination_invoice"] = on_invoice
            if on_credit is not None:
                sub["on_termination_credit_note"] = on_credit
            if sub["status"] == "pending":
                self._cancel(sub, now)
            else:
                self._terminate(sub, now, generate_invoice=sub["on_termination_invoice"] == "generate")
            return {"subscription": self._serialize_sub(sub, extended=True)}

    # Events ------------------------------------------------------------------------------------

    def _validate_event(self, raw: Any, now: datetime) -> tuple[JSON | None, dict[str, list[str]]]:
        if not isinstance(raw, Mapping):
            return None, {"event": ["invalid_format"]}
        raw = _permit_strings(raw, EVENT_STRINGS)
        # EventsController permits ``properties: {}`` and the other keys as scalars: Rails drops a ``properties`` that
        # is not an object, and an object or a list given for ``timestamp`` or ``precise_total_amount_cents``, as if
        # not sent, and Events::CreateService / CreateBatchService store ``params[:properties] || {}`` (a 200, the
        # event without properties, timestamped at reception), never a 422
        if not isinstance(raw.get("properties"), (Mapping, type(None))):
            del raw["properties"]
        for key in ("timestamp", "precise_total_amount_cents"):
            if isinstance(raw.get(key), (Mapping, list)):
                del raw[key]
        errors: dict[str, list[str]] = {}
        for key in EVENT_STRINGS:
            value = raw.get(key)
            if value is None or (isinstance(value, str) and not value.strip()):
                errors[key] = ["value_is_mandatory"]
        if "timestamp" in raw and raw["timestamp"] is not None and raw["timestamp"] != "":
            ts = to_decimal(raw["timestamp"])
            if ts is None:
                errors["timestamp"] = ["invalid_format"]
        else:
            ts = _epoch(now)  # (Time.current.to_f: the reception time, to the microsecond)
        properties = raw.get("properties")
        if properties is None:
            properties = {}
        precise = raw.get("precise_total_amount_cents")
        if precise is not None and to_decimal(precise) is None:
            errors["precise_total_amount_cents"] = ["value_is_invalid"]
        if errors:
            return None, errors
        assert ts is not None
        ts_ms = (ts * 1000).to_integral_value(rounding=ROUND_FLOOR) / Decimal(1000)
        # The time the store keeps: a Postgres timestamp(6) column to the microsecond (Rails truncates), ClickHouse's
        # DateTime64(3) to the millisecond. EventsQuery orders a Postgres store by it; answers show milliseconds.
        kept = ts_ms if self.event_store == "clickhouse" else _floor_us(ts)
        try:
            moment = datetime.fromtimestamp(float(ts_ms), tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None, {"timestamp": ["invalid_format"]}
        event: JSON = {
            "transaction_id": str(raw["transaction_id"]),
            "external_subscription_id": str(raw["external_subscription_id"]),
            "code": str(raw["code"]),
            "timestamp": iso_ms(moment),
            "ts": str(kept),
            "properties": _copied(properties),
            "precise_total_amount_cents": None if precise is None else str(precise),
        }
        return event, {}

    def _dedup_key(self, event: JSON) -> tuple[str, ...]:
        if self.event_store == "postgres":
            return (event["transaction_id"], event["external_subscription_id"])
        return (event["transaction_id"], event["ts"], event["external_subscription_id"], event["code"])

    def _find_event(self, key: tuple[str, ...]) -> int | None:
        return self._event_index.get(key)

    def _store_event(self, event: JSON) -> JSON:
        now = self.now()
        event["lago_id"] = self._uuid()
        event["created_at"] = iso(now)
        event["ingested_at"] = iso_ms(now)  # (ClickHouse's ingested_at / enriched_at: DateTime64(3))
        sub = self._first_active(event["external_subscription_id"])
        event["subscription_id"] = sub["lago_id"] if sub else None
        event["customer_id"] = sub["customer_id"] if sub else None
        key = self._dedup_key(event)
        index = self._find_event(key)
        if index is None:
            self._event_index[key] = len(self.events)
            self.events.append(event)
        else:
            self._first_ingested.setdefault(index, _ingested_at(self.events[index]))
            self.events[index] = event
        return event

    def _serialize_event(self, event: JSON, *, created: bool = False) -> JSON:
        """``V1::EventSerializer``. ``created``: the answer to a ``POST`` (the event as received, not yet processed;
        on ClickHouse an unsaved ``Event``, without ``lago_id`` nor ``created_at``)."""
        unsaved = created and self.event_store == "clickhouse"
        return {
            "lago_id": None if unsaved else event["lago_id"],
            "transaction_id": event["transaction_id"],
            "lago_customer_id": None if created else event["customer_id"],
            "code": event["code"],
            "timestamp": event["timestamp"],
            "precise_total_amount_cents": event["precise_total_amount_cents"],
            "properties": _copied(event["properties"]),
            "lago_subscription_id": None if created else event["subscription_id"],
            "external_subscription_id": event["external_subscription_id"],
            "created_at": None if unsaved else event["created_at"],
        }

    def _read_event(self, event: JSON) -> JSON:
        """An event as ``GET /events`` and ``GET /events/{id}`` read it back. On ClickHouse that is a
        ``Clickhouse::EventsRaw`` row: ``properties`` is a ``Map(String, String)`` (every value as text) and ``id`` is
        ``"<organization_id>-<external_subscription_id>-<transaction_id>-<ingested_at epoch seconds>"``."""
        data = self._serialize_event(event)
        if self.event_store == "clickhouse":
            ingested = parse_datetime(_ingested_at(event))
            epoch = int(ingested.timestamp()) if ingested is not None else 0
            data["lago_id"] = (
                f"{self.organization_id}-{event['external_subscription_id']}-{event['transaction_id']}-{epoch}"
            )
            data["properties"] = _map_text(event["properties"])
        return data

    def create_event(self, body: Any) -> JSON:
        raw = _require_root(body, "event")
        with self.lock:
            self.refresh()
            event, errors = self._validate_event(raw, self.now())
            if errors or event is None:
                raise validation_error(errors)
            if self.event_store == "postgres" and self._find_event(self._dedup_key(event)) is not None:
                raise validation_error({"transaction_id": ["value_already_exist"]})
            stored = self._store_event(event)
            return {"event": self._serialize_event(stored, created=True)}

    def create_events(self, body: Any, *, max_length: int = 100) -> JSON:
        if not isinstance(body, Mapping) or "events" not in body or body["events"] is None:
            raise bad_request("events")
        raw_events = body["events"]
        if not isinstance(raw_events, list):
            raise bad_request("events")
        if not raw_events:
            raise validation_error({"events": ["no_events"]})
        if len(raw_events) > max_length:
            raise validation_error({"events": ["too_many_events"]})
        with self.lock:
            self.refresh()
            now = self.now()
            batch_errors: JSON = {}
            events: list[JSON] = []
            for index, raw in enumerate(raw_events):
                event, errors = self._validate_event(raw, now)
                if errors or event is None:
                    batch_errors[str(index)] = errors
                    continue
                events.append(event)
            if batch_errors:
                raise validation_error(batch_errors)
            if self.event_store == "postgres":
                self._check_batch_insert(events)
            stored = [self._store_event(event) for event in events]
            return {"events": [self._serialize_event(e, created=True) for e in stored]}

    def _check_batch_insert(self, events: Sequence[JSON]) -> None:
        """``CreateBatchService#bulk_insert_events`` (Postgres store), run once every event is valid: ``insert_all``
        skips the rows already stored (or already in the batch) for their ``transaction_id`` and subscription, then the
        returned rows are matched back by ``transaction_id`` alone, each used once; an event left without one is
        ``value_already_exist`` and the batch is rolled back. So a batch giving one ``transaction_id`` to two
        subscriptions is refused, although two single ``POST /events`` are not."""
        inserted: set[tuple[str, ...]] = set()
        returned: set[str] = set()
        for event in events:
            key = self._dedup_key(event)
            if key not in inserted and self._find_event(key) is None:
                inserted.add(key)
                returned.add(event["transaction_id"])
        errors: JSON = {}
        for index, event in enumerate(events):
            if event["transaction_id"] in returned:
                returned.discard(event["transaction_id"])
            else:
                errors[str(index)] = {"transaction_id": ["value_already_exist"]}
        if errors:
            raise validation_error(errors)

    def get_event(self, transaction_id: str) -> JSON:
        with self.lock:
            for event in self._events_by_transaction.records(transaction_id)[:1]:
                return {"event": self._read_event(event)}
            raise not_found("event")

    def list_events(self, query: Mapping[str, Any], *, enriched: bool = False) -> JSON:
        """lago-api ``EventsQuery`` and its ``EventsQueryFiltersContract``; ``enriched``: the page of
        ``GET /events_enriched`` (``V1::EventEnrichedSerializer``)."""
        with self.lock:
            errors: dict[str, list[str]] = {}
            from_started = query.get("timestamp_from_started_at")
            if from_started is not None and from_started not in ("true", "false"):
                errors["timestamp_from_started_at"] = ["must be one of: true, false"]
            from_started_on = from_started == "true"
            if from_started_on and query.get("timestamp_from"):
                errors["timestamp_from"] = ["cannot be used with timestamp_from_started_at"]
            if from_started_on and not query.get("external_subscription_id"):
                errors["external_subscription_id"] = ["required with timestamp_from_started_at"]
            if errors:
                raise validation_error(errors)
            bounds: dict[str, datetime | None] = {}
            for key in ("timestamp_from", "timestamp_to"):  # BaseQuery#parse_datetime_filter: DateTime.iso8601
                bounds[key] = parse_datetime(query.get(key)) if query.get(key) else None
                if query.get(key) and bounds[key] is None:
                    raise validation_error({key: ["invalid_date"]})
            if query.get("external_subscription_id"):
                items = self._events_by_subscription.records(query["external_subscription_id"])
            else:
                items = list(self.events)
            if query.get("code"):
                items = [e for e in items if e["code"] == query["code"]]
            low = bounds["timestamp_from"]
            if from_started_on:  # from the started_at of the subscription (the live one, else the last to end)
                low = self._events_subscription_start(str(query["external_subscription_id"]))
            high = bounds["timestamp_to"]
            if low is not None:
                items = [e for e in items if Decimal(e["ts"]) >= Decimal(repr(low.timestamp()))]
            if high is not None:
                items = [e for e in items if Decimal(e["ts"]) <= Decimal(repr(high.timestamp()))]
            # Postgres store: ORDER BY timestamp DESC, transaction_id ASC (ms timestamps: a float orders them
            # exactly). Only the page asked for is serialized, so a page of a large store costs a sort, not a copy
            # of each event.
            if self.event_store == "postgres":
                items.sort(key=lambda e: e["transaction_id"])
                items.sort(key=lambda e: Decimal(e["ts"]), reverse=True)
            else:
                # ClickHouse: events_raw ORDER BY ingested_at DESC (a replaced event keeps its first copy's place),
                # events_enriched ORDER BY enriched_at DESC (a replaced event's latest copy, enriched last, comes
                # first); then transaction_id ASC both: a batch stored within one second comes in transaction id
                # order (the emulator keeps stored times to the second, Lago to the millisecond; created_at is
                # always iso(): its text orders it)
                first: dict[int, str] = {}
                if self._first_ingested and not enriched:
                    first = {id(self.events[i]): stamp for i, stamp in self._first_ingested.items()}
                items.reverse()
                items.sort(key=lambda e: e["transaction_id"])
                items.sort(key=lambda e: first.get(id(e)) or _ingested_at(e), reverse=True)
            result = paginate(items, "events", query.get("page"), query.get("per_page"))
            serialize = self._serialize_enriched_event if enriched else self._read_event
            result["events"] = [serialize(e) for e in result["events"]]
            return result

    def _serialize_enriched_event(self, event: JSON) -> JSON:
        """``V1::EventEnrichedSerializer``. ``value`` is the event's property named by its metric's ``field_name``
        as text (``None`` without one), ``decimal_value`` that value as a decimal (``""``, Ruby's ``nil.to_s``, when
        it is not a number); ``enriched_at`` is the time the emulator stored the event."""
        metric = self.metrics.get(event["code"])
        field = metric["field_name"] if metric is not None else None
        raw = event["properties"].get(field) if field else None
        value = None if raw is None else _text(raw)
        try:
            number = Decimal(value) if value is not None else None
        except ArithmeticError:
            number = None
        decimal_value = decimal_str(number) if number is not None and number.is_finite() else ""
        stored = _enriched_at(event)
        return {
            "transaction_id": event["transaction_id"],
            "external_subscription_id": event["external_subscription_id"],
            "code": event["code"],
            "timestamp": event["timestamp"],
            "enriched_at": iso_ms(stored),
            "value": value,
            "decimal_value": decimal_value,
            "precise_total_amount_cents": event["precise_total_amount_cents"],
            "properties": _map_text(event["properties"]),  # (Map(String, String), as events_raw)
        }

    def _events_subscription_start(self, external_id: str) -> datetime | None:
        # EventsQuery#subscription: ORDER BY terminated_at DESC NULLS FIRST, started_at DESC
        subs = self._subs_by_external.records(external_id)
        if not subs:
            return None
        live = [s for s in subs if s["terminated_at"] is None]
        pool = live or subs
        best = max(pool, key=lambda s: (s["terminated_at"] or "", s["started_at"] or "", s["seq"]))
        return parse_datetime(best["started_at"])

    def serialized_events(self) -> list[JSON]:
        with self.lock:
            return [self._serialize_event(e) for e in self.events]

    # Usage -------------------------------------------------------------------------------------

    def current_usage(
        self, external_customer_id: str, query: Mapping[str, Any], groups: Mapping[str, Any] | None = None
    ) -> JSON:
        with self.lock:
            self.refresh()
            customer = self._customer(external_customer_id)
            if customer is None:
                raise not_found("customer")
            external_subscription_id = query.get("external_subscription_id")
            sub = next(
                (
                    s
                    for s in self._subs_by_external.records(external_subscription_id)
                    if s["customer_id"] == customer["lago_id"] and s["status"] == "active"
                ),
                None,
            )
            if sub is None:
                raise not_allowed("no_active_subscription")
            if str(query.get("full_usage", "")).lower() in ("true", "1"):
                # needs a charge or group filter and the premium granular_lifetime_usage flag, off here as by default
                raise not_allowed("full_usage_not_allowed")
            plan = self._plan_of(sub)
            charges = plan["charges"]
            for param, field in (
                ("billable_metric_code", "billable_metric_code"),
                ("charge_code", "code"),
                ("filter_by_charge_code", "code"),
                ("charge_id", "lago_id"),
                ("filter_by_charge_id", "lago_id"),
            ):
                if query.get(param):
                    charges = [c for c in charges if c[field] == query[param]]
                    if not charges:
                        raise not_found("charge")
            return {"customer_usage": self._usage_for(sub, self.now(), charges=charges, groups=groups or {})}

    def past_usage(self, external_customer_id: str, query: Mapping[str, Any]) -> JSON:
        """``GET /customers/{id}/past_usage``: lago-api ``PastUsageQuery`` and ``V1::Customers::PastUsageSerializer``.

        One usage period per invoiced period of the customer's subscriptions with that ``external_subscription_id``
        (an upgraded one and its successor share it), whatever the invoice's status, newest charges period first:
        the charges period billed, the invoice's issuing date, currency, ``lago_invoice_id`` and ``fees_amount_cents``
        (the plan's fee included, as Lago sends it), and the charges usage frozen when the period was invoiced
        (narrowed to ``billable_metric_code``'s charges). Paginated by ``page``/``per_page``, then limited to
        ``periods_count`` (see :func:`~._util.paginate_limited`).

        Errors as lago-api answers them: no ``external_subscription_id``, ``422 value_is_mandatory``; an unknown
        ``billable_metric_code``, ``404 billable_metric_not_found``; an unknown customer or subscription is not an
        error (the query joins them): an empty list.
        """
        with self.lock:
            self.refresh()
            external_subscription_id = str(query.get("external_subscription_id") or "")
            if not external_subscription_id.strip():
                raise validation_error({"external_subscription_id": ["value_is_mandatory"]})
            metric_code = query.get("billable_metric_code")
            metric_id: str | None = None
            if metric_code:
                metric = self.metrics.get(str(metric_code))
                if metric is None:
                    raise not_found("billable_metric")
                metric_id = metric["lago_id"]
            customer = self._customer(external_customer_id)
            periods: list[tuple[JSON, JSON]] = []
            for invoice in self._invoices_by_customer.records(customer["lago_id"]) if customer is not None else ():
                for period in invoice.get("invoice_subscriptions") or ():
                    if period["external_subscription_id"] == external_subscription_id:
                        periods.append((invoice, period))
            # order(charges_from_datetime: :desc), then apply_consistent_ordering (created_at desc, id asc)
            periods.sort(key=lambda ip: (ip[1]["charges_from_datetime"], ip[0]["created_at"]), reverse=True)
            page = paginate_limited(
                periods, "usage_periods", query.get("page"), query.get("per_page"), query.get("periods_count")
            )
            page["usage_periods"] = [self._past_period(i, p, metric_id) for i, p in page["usage_periods"]]
            return page

    @staticmethod
    def _past_period(invoice: JSON, period: JSON, metric_id: str | None) -> JSON:
        charges = [
            copy.deepcopy(c)
            for c in period["charges_usage"]
            if metric_id is None or c["billable_metric"]["lago_id"] == metric_id
        ]
        amount = int(invoice.get("fees_amount_cents") or 0)
        taxes = int(invoice.get("taxes_amount_cents") or 0)
        return {
            "from_datetime": period["charges_from_datetime"],
            "to_datetime": period["charges_to_datetime"],
            "issuing_date": str(invoice["issuing_date"]),
            "currency": invoice.get("currency") or "USD",
            "amount_cents": amount,
            "total_amount_cents": amount + taxes,
            "taxes_amount_cents": taxes,
            "lago_invoice_id": invoice["lago_id"],
            "charges_usage": charges,
        }

    def _usage_for(
        self,
        sub: JSON,
        at: datetime,
        *,
        charges: Sequence[JSON] | None = None,
        groups: Mapping[str, Any] | None = None,
    ) -> JSON:
        plan = self._plan_of(sub)
        start, end = self._charges_bounds(sub, at)
        upper = end
        terminated = parse_datetime(sub["terminated_at"])
        exact = parse_datetime(sub.get("_terminated_exact")) if sub.get("_terminated_exact") else None
        if terminated is not None and terminated < upper:
            upper = terminated
        # (the period's last second up to its last microsecond, as Lago's end_of_day; a termination's exact time, as
        # Lago stores it: an upgrade's new subscription counts the events from then on, not these)
        low, high = Decimal(repr(start.timestamp())), Decimal(repr(upper.timestamp())) + Decimal("0.999999")
        if exact is not None and upper == terminated:
            high = Decimal(repr(exact.timestamp()))
        # a recurring metric also reads the events of the periods before (lago-api ``recurring_events_scope``, or
        # the latest cached aggregation): its value carries over
        history = [e for e in self._events_by_subscription.records(sub["external_id"]) if Decimal(e["ts"]) <= high]
        window = [e for e in history if low <= Decimal(e["ts"])]
        full_start, full_end = self._full_charges_bounds(sub, at)
        days = _period_days(full_start, full_end)
        span = Span(low, high, Decimal(days * 86400))
        currency = plan["amount_currency"]
        usages = []
        for charge in plan["charges"] if charges is None else charges:
            metric = next((m for m in self.metrics.values() if m["lago_id"] == charge["billable_metric_id"]), None)
            if metric is None:
                continue
            pool = history if metric["recurring"] else window
            events = [e for e in pool if e["code"] == metric["code"]]
            usages.append(_charge_usage(charge, metric, events, currency, groups or {}, span))
        amount = sum(int(u["amount_cents"]) for u in usages)
        return {
            "from_datetime": iso(start),
            "to_datetime": iso(end),
            # Invoices::CustomerUsageService: issuing_date = DatesService#next_end_of_period, the UTC time of the
            # plan period's local end of day, cast to a date: 2026-03-31 for a UTC customer's March (a yearly plan
            # billing charges monthly still issues at the end of its year)
            "issuing_date": self._period_bounds(sub, at)[1].date().isoformat(),
            "lago_invoice_id": None,
            "currency": currency,
            "amount_cents": amount,
            "taxes_amount_cents": 0,
            "total_amount_cents": amount,
            "charges_usage": usages,
        }

    # Invoices ----------------------------------------------------------------------------------

    def _new_invoice(self, customer: JSON, fields: Mapping[str, Any], *, subscription: JSON | None = None) -> JSON:
        now = self.now()
        seq = self._next("invoice")
        total = int(fields.get("total_amount_cents", fields.get("fees_amount_cents", 0)) or 0)
        invoice: JSON = {
            "lago_id": self._uuid(),
            "billing_entity_code": BILLING_ENTITY_CODE,
            "sequential_id": seq,
            "number": f"FAKE-{customer['sequential_id']:03d}-{seq:03d}",
            "issuing_date": now.date().isoformat(),
            "payment_due_date": now.date().isoformat(),
            "payment_overdue": False,
            "net_payment_term": 0,
            "invoice_type": "subscription",
            "status": "finalized",
            "payment_status": "pending",
            "currency": "USD",
            "fees_amount_cents": total,
            "coupons_amount_cents": 0,
            "credit_notes_amount_cents": 0,
            "sub_total_excluding_taxes_amount_cents": total,
            "taxes_amount_cents": 0,
            "sub_total_including_taxes_amount_cents": total,
            "prepaid_credit_amount_cents": 0,
            "progressive_billing_credit_amount_cents": 0,
            "total_amount_cents": total,
            "total_due_amount_cents": total,
            "total_paid_amount_cents": 0,
            "version_number": 4,
            "self_billed": False,
            "web_url": None,
            "created_at": iso(now),
            "updated_at": iso(now),
            "metadata": [],
            "fees": [],
        }
        invoice.update(copy.deepcopy(dict(fields)))
        if "total_due_amount_cents" not in fields:
            paid = invoice["payment_status"] == "succeeded"
            invoice["total_due_amount_cents"] = 0 if paid else int(invoice["total_amount_cents"])
            invoice["total_paid_amount_cents"] = int(invoice["total_amount_cents"]) if paid else 0
        invoice["customer_id"] = customer["lago_id"]
        invoice["subscription_ids"] = [subscription["lago_id"]] if subscription else []
        self.invoices.append(invoice)
        return invoice

    def _serialize_invoice(self, invoice: JSON, *, extended: bool = False) -> JSON:
        data = {k: copy.deepcopy(v) for k, v in invoice.items() if k not in _INVOICE_INTERNAL}
        customer = self._customer_by_id(invoice["customer_id"])
        if customer is not None:
            data["customer"] = self._serialize_customer(customer)
        data.setdefault("applied_taxes", [])
        data.setdefault("applied_invoice_custom_sections", [])
        data.setdefault("applied_usage_thresholds", [])
        if extended:
            data["fees"] = copy.deepcopy(invoice["fees"])
            # (V1::CreditSerializer: each credit with its invoice's current payment_status)
            data["credits"] = [
                {
                    **copy.deepcopy(c),
                    "invoice": {"lago_id": invoice["lago_id"], "payment_status": invoice["payment_status"]},
                }
                for c in invoice.get("credits") or []
            ]
            data["billing_periods"] = []
            data["subscriptions"] = [
                self._serialize_sub(s)
                for i in invoice["subscription_ids"]
                if (s := self._find_sub_by_id(i)) is not None
            ]
        return data

    def add_invoice(self, external_customer_id: str, fields: Mapping[str, Any]) -> JSON:
        # (before the customer is made: a refusal stores nothing)
        fields = _checked_seeded("invoice", fields, (*INVOICE_AMOUNTS, "sequential_id"))
        with self.lock:
            customer = self._customer(external_customer_id) or self._new_customer(external_customer_id)
            invoice = self._new_invoice(customer, fields)
            return {"invoice": self._serialize_invoice(invoice, extended=True)}

    def list_invoices(
        self, query: Mapping[str, Any], multi: Mapping[str, list[str]], external_customer_id: str | None = None
    ) -> JSON:
        with self.lock:
            self.refresh()
            wanted = external_customer_id or query.get("external_customer_id") or query.get("customer_external_id")
            if external_customer_id is not None and self._customer(external_customer_id) is None:
                raise not_found("customer")
            self._check_billing_entity_codes(multi)
            if wanted:
                items = self._held_by(self._invoices_by_customer, self.invoices, wanted)
            else:
                items = list(self.invoices)
            # InvoiceIndex: status: params[:status] || params[:statuses], each a value or a list; InvoicesQuery keeps
            # only the visible statuses of those (all of them when none is given)
            wanted_statuses = _multi_values(multi, "status", "statuses") or list(VISIBLE_INVOICE_STATUSES)
            items = [i for i in items if i["status"] in wanted_statuses and i["status"] in VISIBLE_INVOICE_STATUSES]
            payment_statuses = _multi_values(multi, "payment_status", "payment_statuses")
            if payment_statuses:
                items = [i for i in items if i["payment_status"] in payment_statuses]
            if query.get("invoice_type"):
                items = [i for i in items if i["invoice_type"] == query["invoice_type"]]
            if query.get("currency"):
                items = [i for i in items if i.get("currency") == query["currency"]]
            # an unparsable issuing_date_from/to is ignored (InvoiceIndex#valid_date?)
            since, until = _iso_date(query.get("issuing_date_from")), _iso_date(query.get("issuing_date_to"))
            if since is not None:
                items = [i for i in items if str(i["issuing_date"]) >= since]
            if until is not None:
                items = [i for i in items if str(i["issuing_date"]) <= until]
            for param, field in (("payment_overdue", "payment_overdue"), ("self_billed", "self_billed")):
                if query.get(param) not in (None, ""):
                    flag = _boolean(query[param])
                    items = [i for i in items if bool(i.get(field)) == flag]
            if query.get("payment_dispute_lost") not in (None, ""):
                lost = _boolean(query["payment_dispute_lost"])
                items = [i for i in items if (i.get("payment_dispute_lost_at") is not None) == lost]
            items = [i for i in items if _metadata_matches(i.get("metadata") or [], query)]
            term = str(query.get("search_term") or "").strip().lower()
            if term:
                items = [i for i in items if self._invoice_matches(i, term, search_customers=not wanted)]
            for param, sign in (("amount_from", 1), ("amount_to", -1)):
                if query.get(param):
                    try:
                        bound = int(query[param])
                    except ValueError:
                        raise validation_error({param: ["value_is_invalid"]}) from None
                    items = [i for i in items if sign * (int(i.get("total_amount_cents") or 0) - bound) >= 0]
            items.sort(key=lambda i: (i["issuing_date"], i["sequential_id"]), reverse=True)
            return _page(items, "invoices", query, self._serialize_invoice)

    def _held_by(self, index: _Index, records: list[JSON], external_customer_id: Any) -> list[JSON]:
        """The records of ``index`` (by customer) of the customers with that external id, deleted ones too, in the
        list's order."""
        ids = self._customer_ids(external_customer_id)
        positions = sorted(p for lago_id in ids for p in index.positions(lago_id))
        return [records[p] for p in positions]

    def _invoice_matches(self, invoice: JSON, term: str, *, search_customers: bool) -> bool:
        """InvoicesQuery search_term: the number, the exact lago_id, and (without a customer filter) the customer's
        name, firstname, lastname, external_id or email, case-insensitively."""
        if term in str(invoice.get("number") or "").lower() or term == str(invoice["lago_id"]).lower():
            return True
        customer = self._customer_by_id(invoice["customer_id"])
        if not search_customers or customer is None:
            return False
        f = customer["fields"]
        values = (f.get("name"), f.get("firstname"), f.get("lastname"), customer["external_id"], f.get("email"))
        return any(term in str(v).lower() for v in values if v)

    def update_invoice(self, lago_id: str, body: Any) -> JSON:
        """``PUT /invoices/{lago_id}`` (lago-api ``Invoices::UpdateService``): its ``payment_status`` (``pending``,
        ``succeeded``, ``failed``; a succeeded payment pays the total: ``total_paid_amount_cents``, nothing due) and
        its ``metadata`` (the items given, an ``id`` naming one kept; the others removed). A changed payment status
        sends ``invoice.payment_status_updated``."""
        params = _mapping(_require_root(body, "invoice"))
        with self.lock:
            self.refresh()
            invoice = next((i for i in self._invoices_by_id.records(lago_id) if i["status"] != "closed"), None)
            if invoice is None:
                raise not_found("invoice")
            status = params.get("payment_status")
            errors: dict[str, list[str]] = {}
            if status is not None and status not in ("pending", "succeeded", "failed"):
                errors["payment_status"] = ["value_is_invalid"]
            raw_metadata = params.get("metadata")
            if raw_metadata is not None and (
                not isinstance(raw_metadata, list) or not all(isinstance(m, Mapping) for m in raw_metadata)
            ):
                errors["metadata"] = ["invalid_format"]
            if errors:
                raise validation_error(errors)
            now = iso(self.now())
            if raw_metadata is not None:
                kept = {m["lago_id"]: m for m in invoice.get("metadata") or []}
                metadata = []
                for raw in raw_metadata:
                    item = kept.get(str(raw.get("id"))) or {"lago_id": self._uuid(), "created_at": now}
                    metadata.append({**item, "key": str(raw.get("key")), "value": str(raw.get("value"))})
                invoice["metadata"] = metadata
            changed = status is not None and status != invoice["payment_status"]
            if changed:
                invoice["payment_status"] = status
                if status == "succeeded":
                    invoice["total_paid_amount_cents"] = int(invoice["total_amount_cents"])
                offsets = sum(
                    int(n.get("offset_amount_cents") or 0)
                    for n in self._notes_by_customer.records(invoice["customer_id"])
                    if n["lago_invoice_id"] == lago_id and n.get("credit_status") != "voided"
                )
                due = int(invoice["total_amount_cents"]) - int(invoice["total_paid_amount_cents"]) - offsets
                invoice["total_due_amount_cents"] = max(due, 0)
            invoice["updated_at"] = now
            result = self._serialize_invoice(invoice, extended=True)
            if changed:
                self._emit("invoice.payment_status_updated", "invoice", result)
            return {"invoice": result}

    def get_invoice(self, lago_id: str) -> JSON:
        with self.lock:
            self.refresh()
            for invoice in self._invoices_by_id.records(lago_id):
                if invoice["status"] != "closed":  # (invoices.visible)
                    return {"invoice": self._serialize_invoice(invoice, extended=True)}
            raise not_found("invoice")

    # Wallets, applied coupons, credit notes (what a customer holds besides subscriptions) ------------
    # Seeded (add_wallet, add_applied_coupon, add_credit_note) and listed as Lago lists them; subscription invoices
    # consume them (_settle_invoice); wallets are never topped up. Credit notes are also made by the termination or
    # the upgrade of a pay-in-advance plan (_credit_unused_days).

    def _holder(self, external_customer_id: str) -> JSON:
        return self._customer(external_customer_id) or self._new_customer(external_customer_id)

    def add_wallet(self, external_customer_id: str, fields: Mapping[str, Any]) -> JSON:
        """Store a wallet (``fields``: WalletObject fields; ``credits_balance`` or ``balance_cents`` gives the other
        by ``rate_amount`` and the currency's subunits). Lago's wallet currency must be the customer's: one without a
        currency takes the wallet's."""
        params = _checked_seeded("wallet", fields)
        with self.lock:
            currency = params.get("currency") or "USD"
            rate = to_decimal(params.get("rate_amount", "1"))
            status = params.get("status", "active")
            errors: dict[str, list[str]] = {}
            if not _valid_currency(currency):
                errors["currency"] = ["value_is_invalid"]
            if rate is None or rate <= 0:
                errors["rate_amount"] = ["value_is_invalid"]
            if status not in ("active", "terminated"):
                errors["status"] = ["value_is_invalid"]
            # The balance, its priority and top-up rules: read later as numbers and rule objects (a word or a list
            # raised ValueError/TypeError here, or at the customer's next invoice; "abc" or 1e400 credits were 0)
            credits: Decimal | None = None
            balance: int | None = 0
            if params.get("credits_balance") is not None:
                credits = to_decimal(params["credits_balance"])
                if rate is not None and rate > 0 and _valid_currency(currency) and credits is not None:
                    amount = credits * rate * subunits_per_unit(currency)
                    # (compared first: rounding 1e999999999 credits to cents would build their billion digits)
                    balance = _bigint(cents(amount)) if abs(amount) < 2**63 else None
                if credits is None or balance is None:
                    errors["credits_balance"] = ["value_is_invalid"]
            elif params.get("balance_cents") is not None:
                balance = _bigint(params["balance_cents"])
                if balance is None:
                    errors["balance_cents"] = ["value_is_invalid"]
            if params.get("priority") is not None:
                priority = _bigint(params["priority"])
                if priority not in WALLET_PRIORITIES:
                    errors["priority"] = ["value_is_invalid"]
                params["priority"] = priority
            rules = params.get("recurring_transaction_rules")
            if rules is not None and (not isinstance(rules, list) or not all(isinstance(r, Mapping) for r in rules)):
                # (Lago's code for a rule it cannot use: Wallets::ValidateRecurringTransactionRulesService)
                errors["recurring_transaction_rules"] = ["invalid_recurring_rule"]
            if errors:
                raise validation_error(errors)
            assert rate is not None and balance is not None
            customer = self._holder(external_customer_id)
            current = customer["fields"].get("currency")
            if current not in (None, "") and current != currency:
                raise validation_error({"currency": ["currencies_does_not_match"]})
            customer["fields"]["currency"] = currency
            unit = subunits_per_unit(currency)
            if credits is None:
                credits = Decimal(balance) / unit / rate
            now = iso(self.now())
            wallet: JSON = {
                "lago_id": self._uuid(),
                "lago_customer_id": customer["lago_id"],
                "external_customer_id": customer["external_id"],
                "billing_entity_code": BILLING_ENTITY_CODE,
                "status": status,
                "currency": currency,
                "name": None,
                "code": None,
                "priority": 50,
                "rate_amount": decimal_str(rate),
                "credits_balance": decimal_str(credits),
                "balance": decimal_str(Decimal(balance) / unit),
                "balance_cents": balance,
                "consumed_credits": "0.0",
                "created_at": now,
                "expiration_at": None,
                "last_balance_sync_at": now,
                "last_consumed_credit_at": None,
                "terminated_at": now if status == "terminated" else None,
                "invoice_requires_successful_payment": False,
                "ongoing_balance_cents": balance,
                "ongoing_usage_balance_cents": 0,
                "credits_ongoing_balance": decimal_str(credits),
                "credits_ongoing_usage_balance": "0.0",
                "paid_top_up_min_amount_cents": None,
                "paid_top_up_max_amount_cents": None,
                "applied_invoice_custom_sections": [],
                "purchase_order_number": None,
                "metadata": None,  # (OAS MetadataObject: an object of key-value pairs)
            }
            wallet.update(
                {k: copy.deepcopy(v) for k, v in params.items() if k not in ("credits_balance", "balance_cents")}
            )
            wallet.update(currency=currency, rate_amount=decimal_str(rate))
            wallet["recurring_transaction_rules"] = [self._recurring_rule(rule) for rule in rules or []]
            wallet["customer_id"] = customer["lago_id"]
            self.wallets.append(wallet)
            return {"wallet": self._serialize_wallet(wallet)}

    def _recurring_rule(self, raw: Mapping[str, Any]) -> JSON:
        rule: JSON = {
            "lago_id": self._uuid(),
            "trigger": "interval",
            "method": "fixed",
            "interval": "monthly",
            "status": "active",
            "threshold_credits": "0.0",
            "paid_credits": "0.0",
            "granted_credits": "0.0",
            "grants_target_top_up": None,
            "started_at": None,
            "target_ongoing_balance": None,
            "created_at": iso(self.now()),
            "expiration_at": None,
            "invoice_requires_successful_payment": False,
            "transaction_metadata": [],
            "transaction_name": None,
            "ignore_paid_top_up_limits": False,
        }
        rule.update(copy.deepcopy(dict(raw)))
        return rule

    @staticmethod
    def _serialize_wallet(wallet: JSON) -> JSON:
        return {k: copy.deepcopy(v) for k, v in wallet.items() if k != "customer_id"}

    def list_wallets(self, query: Mapping[str, Any], external_customer_id: str | None = None) -> JSON:
        """``GET /wallets?external_customer_id=`` (required: Lago answers ``404 customer_not_found`` without a customer
        of that id), or ``GET /customers/{external_customer_id}/wallets``: every wallet of the customer, active and
        terminated."""
        with self.lock:
            wanted = external_customer_id or query.get("external_customer_id")
            customer = self._customer(str(wanted)) if wanted else None
            if customer is None:
                raise not_found("customer")
            items = self._wallets_by_customer.records(customer["lago_id"])
            if query.get("currency"):
                items = [w for w in items if w["currency"] == query["currency"]]
            items.sort(key=lambda w: w["created_at"], reverse=True)
            return _page(items, "wallets", query, self._serialize_wallet)

    def add_applied_coupon(self, external_customer_id: str, coupon_code: str, fields: Mapping[str, Any]) -> JSON:
        """Store a coupon applied to a customer (``fields``: AppliedCouponObject fields; a fixed amount by
        ``amount_cents``, else a ``percentage_rate``)."""
        params = dict(fields)
        with self.lock:
            errors: dict[str, list[str]] = {}
            frequency = params.get("frequency", "forever")
            if frequency not in COUPON_FREQUENCIES:
                errors["frequency"] = ["value_is_invalid"]
            if params.get("status", "active") not in ("active", "terminated"):
                errors["status"] = ["value_is_invalid"]
            if not coupon_code:
                errors["coupon_code"] = ["value_is_mandatory"]
            if params.get("amount_cents") is None and params.get("percentage_rate") is None:
                errors["amount_cents"] = ["value_is_mandatory"]
            if params.get("percentage_rate") is not None and to_decimal(params["percentage_rate"]) is None:
                errors["percentage_rate"] = ["value_is_invalid"]  # (it was taken as a fixed coupon of 0)
            if errors:
                raise validation_error(errors)
            # (a word or a list raised ValueError/TypeError at the customer's next invoice: a 500 over HTTP)
            params = _checked_seeded("applied_coupon", params, APPLIED_COUPON_INTEGERS)
            customer = self._holder(external_customer_id)
            amount = params.get("amount_cents")
            now = iso(self.now())
            coupon: JSON = {
                "lago_id": self._uuid(),
                "lago_coupon_id": self._uuid(),
                "coupon_code": coupon_code,
                "coupon_name": coupon_code,
                "coupon_status": "active",
                "coupon_deleted_at": None,
                "lago_customer_id": customer["lago_id"],
                "external_customer_id": customer["external_id"],
                "status": "active",
                "amount_cents": amount,
                "amount_cents_remaining": amount if amount is not None and frequency == "once" else None,
                "amount_currency": (params.get("amount_currency") or customer["fields"].get("currency") or "USD")
                if amount is not None
                else None,
                "percentage_rate": None,
                "frequency": frequency,
                "frequency_duration": None,
                "frequency_duration_remaining": None,
                "expiration_at": None,
                "created_at": now,
                "terminated_at": None,
            }
            coupon.update(copy.deepcopy(params))
            if coupon["frequency"] == "recurring" and coupon["frequency_duration_remaining"] is None:
                coupon["frequency_duration_remaining"] = coupon["frequency_duration"]
            if coupon["status"] == "terminated" and coupon["terminated_at"] is None:
                coupon["terminated_at"] = now
            coupon["customer_id"] = customer["lago_id"]
            self.applied_coupons.append(coupon)
            return {"applied_coupon": self._serialize_applied_coupon(coupon)}

    @staticmethod
    def _serialize_applied_coupon(coupon: JSON) -> JSON:
        data = {k: copy.deepcopy(v) for k, v in coupon.items() if k != "customer_id"}
        data["credits"] = []  # (AppliedCouponObjectExtended: the invoices' credits it gave)
        return data

    def list_applied_coupons(
        self, query: Mapping[str, Any], multi: Mapping[str, list[str]], external_customer_id: str | None = None
    ) -> JSON:
        """``GET /applied_coupons`` (filters ``external_customer_id``, ``status``, ``coupon_code[]``; an unknown
        customer lists nothing), or ``GET /customers/{external_customer_id}/applied_coupons`` (an unknown customer:
        ``404 customer_not_found``)."""
        with self.lock:
            if external_customer_id is not None and self._customer(external_customer_id) is None:
                raise not_found("customer")
            wanted = external_customer_id or query.get("external_customer_id")
            if wanted:
                customer = self._customer(str(wanted))
                items = self._coupons_by_customer.records(customer["lago_id"]) if customer is not None else []
            else:
                items = list(self.applied_coupons)
            if query.get("status"):
                items = [c for c in items if c["status"] == query["status"]]
            codes = _multi_values(multi, "coupon_code")
            if codes:
                items = [c for c in items if c["coupon_code"] in codes]
            items.sort(key=lambda c: c["created_at"], reverse=True)
            return _page(items, "applied_coupons", query, self._serialize_applied_coupon)

    def add_credit_note(self, lago_invoice_id: str, fields: Mapping[str, Any]) -> JSON:
        """Store a credit note of an invoice (``fields``: CreditNoteObject fields; ``credit_amount_cents`` is what
        it credits, ``balance_amount_cents`` what remains of it: all of it by default)."""
        params = dict(fields)
        with self.lock:
            invoice = next(iter(self._invoices_by_id.records(lago_invoice_id)), None)
            if invoice is None:
                raise not_found("invoice")
            params = _checked_seeded("credit_note", params, CREDIT_NOTE_AMOUNTS)
            note = self._credit_note_record(invoice, params)
            if note["credit_status"] not in ("available", "consumed", "voided", None):
                raise validation_error({"credit_status": ["value_is_invalid"]})
            self.credit_notes.append(note)
            return {"credit_note": self._serialize_credit_note(note)}

    def _credit_note_record(self, invoice: JSON, params: Mapping[str, Any]) -> JSON:
        """A credit note of ``invoice`` (``params``: CreditNoteObject fields over the defaults), not yet stored."""
        credit = int(params.get("credit_amount_cents", 0) or 0)
        refund = int(params.get("refund_amount_cents", 0) or 0)
        offset = int(params.get("offset_amount_cents", 0) or 0)
        total = credit + refund + offset
        seq = self._next(f"credit_note:{invoice['lago_id']}")
        now = self.now()
        note: JSON = {
            "lago_id": self._uuid(),
            "billing_entity_code": BILLING_ENTITY_CODE,
            "sequential_id": seq,
            "number": f"{invoice['number']}-CN{seq:03d}",
            "lago_invoice_id": invoice["lago_id"],
            "invoice_number": invoice["number"],
            "issuing_date": now.date().isoformat(),
            "credit_status": "available" if credit else None,
            "refund_status": "pending" if refund else None,
            "reason": "other",
            "description": None,
            "currency": invoice.get("currency") or "USD",
            "total_amount_cents": total,
            "taxes_amount_cents": 0,
            "taxes_rate": 0,
            "sub_total_excluding_taxes_amount_cents": total,
            "balance_amount_cents": credit,
            "credit_amount_cents": credit,
            "refund_amount_cents": refund,
            "offset_amount_cents": offset,
            "coupons_adjustment_amount_cents": 0,
            "created_at": iso(now),
            "updated_at": iso(now),
            "file_url": None,
            "self_billed": False,
            "items": [],
            "applied_taxes": [],
            "metadata": None,
        }
        note.update(copy.deepcopy(dict(params)))
        note["customer_id"] = invoice["customer_id"]
        return note

    def _serialize_credit_note(self, note: JSON) -> JSON:
        data = {k: copy.deepcopy(v) for k, v in note.items() if k != "customer_id"}
        customer = self._customer_by_id(note["customer_id"])
        if customer is not None:
            data["customer"] = self._serialize_customer(customer)
        return data

    def list_credit_notes(self, query: Mapping[str, Any], external_customer_id: str | None = None) -> JSON:
        """``GET /credit_notes`` (filters ``external_customer_id``, ``credit_status``, ``refund_status``,
        ``currency``), newest first; ``GET /customers/{external_customer_id}/credit_notes`` (an unknown customer:
        ``404 customer_not_found``)."""
        with self.lock:
            self.refresh()  # (a subscription reaching its ending_at by now has its termination's credit note)
            if external_customer_id is not None and self._customer(external_customer_id) is None:
                raise not_found("customer")
            wanted = external_customer_id or query.get("external_customer_id")
            if wanted:
                items = self._held_by(self._notes_by_customer, self.credit_notes, wanted)
            else:
                items = list(self.credit_notes)
            for param in ("credit_status", "refund_status", "currency"):
                if query.get(param):
                    items = [n for n in items if n.get(param) == query[param]]
            items.sort(key=lambda n: (n["created_at"], n["lago_id"]), reverse=True)
            return _page(items, "credit_notes", query, self._serialize_credit_note)

    # Read-only views ---------------------------------------------------------------------------

    def serialized_customers(self) -> list[JSON]:
        with self.lock:
            return [self._serialize_customer(c) for c in self.customers if c["deleted_at"] is None]

    def serialized_subscriptions(self) -> list[JSON]:
        with self.lock:
            return [self._serialize_sub(s) for s in self.subscriptions]

    def serialized_invoices(self) -> list[JSON]:
        with self.lock:
            return [self._serialize_invoice(i) for i in self.invoices]


# Usage computation ----------------------------------------------------------------------------

# what an invoice record keeps that its serialization does not show as it is
_INVOICE_INTERNAL = frozenset(("customer_id", "subscription_ids", "fees", "invoice_subscriptions", "credits"))


def _metadata_text(value: Any) -> str | None:
    """A metadata key or value as Lago stores it: a scalar in a string column (``true`` as ``"t"``), ``None`` for what
    ``permit`` drops (an object, a list) or null."""
    if value is None or isinstance(value, (Mapping, list)):
        return None
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value)


def _serialize_integration(item: Mapping[str, Any]) -> JSON:
    """OAS ``IntegrationCustomer``: ``external_customer_id`` and ``integration_code`` are strings (empty until the
    integration's sync fills them), ``subsidiary_id`` present only when given."""
    data: JSON = {"lago_id": item["lago_id"], "type": item["type"]}
    data["integration_code"] = str(item.get("integration_code") or "")
    data["external_customer_id"] = str(item.get("external_customer_id") or "")
    data["sync_with_provider"] = item.get("sync_with_provider")
    if item.get("subsidiary_id") is not None:
        data["subsidiary_id"] = str(item["subsidiary_id"])
    return data


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return iso(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


class _Refusal(NamedTuple):
    """The validation error Lago answers for a privilege value: ``error_details`` ``{field: [error]}``."""

    field: str
    error: str


#: The text lago-api's ``value.to_i.to_s == value`` keeps: an integer as Ruby writes it ("007", " 300", "+5", "-0"
#: and "1_000" read as numbers but are not written back the same; "²" and other digits than ASCII read as 0)
_RUBY_INTEGER_TEXT = re.compile("0|-?[1-9][0-9]*")
#: Ruby's ``[[:space:]]`` (Unicode White_Space), what ActiveSupport's ``blank?`` skips; unlike ``str.isspace`` it
#: does not hold the separators U+001C-U+001F
_RUBY_SPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    chr(c) for c in range(0x2000, 0x200B)
)


def _cast_privilege(privilege: JSON, value: Any) -> Any:
    """``value`` for ``privilege``, cast to its ``value_type``, or the :class:`_Refusal` Lago answers.

    lago-api ``Entitlement::Concerns::CreateOrUpdateConcern#validate_value``: a select value must be one of the
    options (strings: ``5`` is not ``"5"``); a boolean ``true``/``false`` or their text; an integer a JSON integer
    or text that ``to_i.to_s`` gives back unchanged; a string a JSON string. ``nil`` passes it, then the
    ``EntitlementValue`` presence validation refuses it, as it does a blank string (``privilege.value``)."""
    invalid = _Refusal(f"{privilege['code']}_privilege_value", "value_is_invalid")
    if value is None:
        return _Refusal("privilege.value", "value_is_mandatory")
    value_type = privilege["value_type"]
    cast: Any
    if value_type == "select":
        options = [str(o) for o in privilege["config"].get("select_options") or []]
        if not isinstance(value, str) or value not in options:
            return _Refusal(invalid.field, "value_not_in_select_options")
        cast = value
    elif value_type == "boolean":
        if isinstance(value, bool):
            return value
        if value not in ("true", "false"):
            return invalid
        cast = value == "true"
    elif value_type == "integer":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if not isinstance(value, str) or not _RUBY_INTEGER_TEXT.fullmatch(value):
            return invalid
        try:
            cast = int(value)
        except ValueError:  # (over Python's 4300 digits for int(): Lago keeps it, no JSON answer here could hold it)
            return invalid
    elif isinstance(value, str):
        cast = value
    else:
        return invalid
    if isinstance(value, str) and all(ch in _RUBY_SPACE for ch in value):
        return _Refusal("privilege.value", "value_is_mandatory")
    return cast


def _valid_currency(value: Any) -> bool:
    """Whether Lago takes ``value`` as a currency: one of its ISO 4217 codes (see ``_accepted``), not any three
    capital letters."""
    return isinstance(value, str) and value in CURRENCIES


def _check_on_termination(params: Mapping[str, Any], errors: dict[str, list[str]]) -> None:
    # lago-api Subscriptions::ValidateService#valid_on_termination_*?: error code "invalid_value"
    if params.get("on_termination_invoice") not in (None, "", "generate", "skip"):
        errors["on_termination_invoice"] = ["invalid_value"]
    if params.get("on_termination_credit_note") not in (None, "", "credit", "refund", "offset", "skip"):
        errors["on_termination_credit_note"] = ["invalid_value"]


def _valid_metric_filters(filters: Any) -> bool:
    return isinstance(filters, list) and all(
        isinstance(f, Mapping) and isinstance(f.get("key"), str) and isinstance(f.get("values"), list) and f["values"]
        for f in filters
    )


def _boolean(value: Any) -> bool:
    """Rails ``ActiveModel::Type::Boolean`` cast of a query value: false for "false", "0", "f", "off" (any case)."""
    return str(value).strip().lower() not in ("false", "0", "f", "off")


def _multi_values(multi: Mapping[str, list[str]], *names: str) -> list[str]:
    """The values of the first of ``names`` given, as ``name=x`` or ``name[]=x&name[]=y`` (Rails' params)."""
    for name in names:
        values = [v for v in (*multi.get(name, []), *multi.get(f"{name}[]", [])) if v != ""]
        if values:
            return values
    return []


def _iso_date(value: Any) -> str | None:
    """A day Lago reads (``Date.strptime(value)``: ``YYYY-MM-DD``), else ``None``: not ``date.fromisoformat``'s, which
    reads ``20260315`` and week dates (``2026-W11-1``) from Python 3.11 on, days Lago ignores (as 3.10 did)."""
    if not isinstance(value, str) or not _ISO_DAY.fullmatch(value.strip()):
        return None
    try:
        return date.fromisoformat(value.strip()).isoformat()
    except ValueError:  # (2026-02-30)
        return None


_ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _metadata_matches(items: Sequence[Mapping[str, Any]], query: Mapping[str, Any]) -> bool:
    """``metadata[key]=value`` filters (customers and invoices): every such key must be present with that value;
    ``metadata[key]=`` (empty) asks for the key to be absent (lago-api ``CustomersQuery#with_metadata``)."""
    for key, value in query.items():
        if not (key.startswith("metadata[") and key.endswith("]")):
            continue
        name = key[len("metadata[") : -1]
        if value in (None, ""):
            if any(m.get("key") == name for m in items):
                return False
        elif not any(m.get("key") == name and str(m.get("value")) == str(value) for m in items):
            return False
    return True


def _default_field(field: str) -> Any:
    return "customer" if field == "account_type" else None


_SCALARS = frozenset((str, int, float, bool, type(None)))


def _copied(properties: Mapping[str, Any]) -> JSON:
    """A copy of an event's properties that shares nothing mutable with them: the usual flat map of scalars copied
    as a dict (a deep copy of each event's properties was most of a batch's ingestion), nested values deep-copied."""
    if all(map(_SCALARS.__contains__, map(type, properties.values()))):
        return dict(properties)
    return copy.deepcopy(dict(properties))


class Span(NamedTuple):
    """A charges period as an aggregation reads it: ``start`` and ``end`` in Unix seconds (``end`` at the period's
    last microsecond, or the termination), and ``seconds``, the full period's length (``charges_duration`` days)."""

    start: Decimal
    end: Decimal
    seconds: Decimal


_PG_MIN_SIG_DIGITS = 16


def _period_days(start: datetime, end: datetime) -> int:
    """The days of a billing period ``start``..``end`` (its last second), as lago-api counts them to prorate a fee
    (``DatesService#charges_duration_in_days`` / ``duration_in_days``)."""
    return round((end + timedelta(seconds=1) - start).total_seconds() / 86400)


def _pg_scale(value: Decimal) -> int:
    """The display scale PostgreSQL keeps for a ``numeric`` (its digits after the point)."""
    exponent = value.as_tuple().exponent
    return max(-exponent, 0) if isinstance(exponent, int) else 0


def _pg_div(dividend: Decimal, divisor: Decimal) -> Decimal:
    """PostgreSQL's ``numeric / numeric`` (``select_div_scale``): at least 16 significant digits, no fewer decimals
    than either operand, rounded half away from zero."""
    if dividend == 0:
        return Decimal(0)

    def weight_and_digit(value: Decimal) -> tuple[int, int]:
        weight = value.adjusted() // 4  # base-10000 digits, as numeric stores them
        return weight, int(abs(value).scaleb(-4 * weight))

    weight1, digit1 = weight_and_digit(dividend)
    weight2, digit2 = weight_and_digit(divisor)
    qweight = weight1 - weight2 - (1 if digit1 < digit2 else 0)
    scale = max(_PG_MIN_SIG_DIGITS - qweight * 4, _pg_scale(dividend), _pg_scale(divisor), 0)
    scale = min(scale, 1000)
    context = Context(prec=max(dividend.adjusted(), 0) + scale + 40)
    return context.divide(dividend, divisor).quantize(
        Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP, context=context
    )


_EPOCH_SCALE = Decimal("0.000001")  # EXTRACT(EPOCH FROM interval) is a numeric with 6 decimals


def _weighted_sum(values: Sequence[tuple[Decimal, Decimal]], span: Span) -> Decimal:
    """lago-api ``Events::Stores::Postgres::WeightedSumQuery``: ``values`` are (timestamp, value) in timestamp order,
    those before ``span.start`` (a recurring metric's) forming the initial value. Each running total is weighted by
    the seconds until the next event (or the period's end), divided by the full period's seconds (each product
    divided as PostgreSQL divides numerics), the ratios summed, then ``ceil(20)``."""
    initial = sum((v for ts, v in values if ts < span.start), Decimal(0))
    rows = [(span.start, initial)] + [(ts, v) for ts, v in values if ts >= span.start] + [(span.end, Decimal(0))]
    total = Decimal(0)
    running = Decimal(0)
    for (ts, value), (following, _) in zip(rows, [*rows[1:], (span.end, Decimal(0))], strict=True):
        running += value
        seconds = (following - ts).quantize(_EPOCH_SCALE)
        if seconds == 0:
            continue
        total += _pg_div(running * seconds, span.seconds)
    context = Context(prec=max(total.adjusted(), 0) + 40)
    return total.quantize(Decimal("1e-20"), rounding=ROUND_CEILING, context=context).normalize(context)


#: The text lago-api's event store takes for a number (``PostgresStore#numeric_condition``: ``properties ->> field ~
#: '^-?\d+(\.\d+)?$'``, ``\d`` ASCII digits under PostgreSQL's libc and C locales): "1e3", " 5", "+5", "5.", ".5",
#: "NaN", "Infinity", "1_000" or "5\n" are none ("$" ends the text there, as ``fullmatch`` does, not before a "\n")
_NUMERIC_TEXT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def _property_number(value: Any) -> Decimal | None:
    """An event property's value as a sum, max, latest or weighted sum reads it, else ``None``: the event is left out
    (not counted, not refused), as lago-api's event store with ``numeric_property`` leaves it out. A JSON number is
    always one (jsonb writes a numeric back without exponent, so its text matches); text only as
    :data:`_NUMERIC_TEXT` (``Decimal`` reads far more: "1e3", " 5", "+5", ".5", "1_000", other scripts' digits);
    a boolean, null, object or list never. (The Postgres store's rule, read on both stores: ClickHouse's
    ``events_enriched.decimal_value``, ``toDecimal128OrZero(value, 26)``, makes a non-number, or a number of 12 or
    more integer digits, an event of value 0, counted: not emulated.)"""
    if isinstance(value, str):
        if _NUMERIC_TEXT.fullmatch(value) is None:
            return None
        number = Decimal(value)
        return number if number else number.copy_abs()  # ("-0"::numeric is 0: no negative zero in a numeric)
    return to_decimal(value)


def _aggregate(metric: JSON, events: Sequence[JSON], span: Span | None = None) -> Decimal:
    aggregation = metric["aggregation_type"]
    if aggregation == "count_agg":
        return Decimal(len(events))
    field = metric["field_name"]
    if aggregation == "weighted_sum_agg" and span is not None:
        ordered = sorted(events, key=lambda e: Decimal(e["ts"]))
        pairs = [(Decimal(e["ts"]), _property_number(e["properties"].get(field))) for e in ordered]
        return _weighted_sum([(ts, v) for ts, v in pairs if v is not None], span)
    if aggregation in ("sum_agg", "weighted_sum_agg", "custom_agg", "max_agg"):  # order does not matter
        whole: list[int] = []  # plain ints, the usual values, summed without a Decimal each
        exact: list[Decimal] = []
        for event in events:
            raw = event["properties"].get(field)
            if type(raw) is int:
                whole.append(raw)
            else:
                value = _property_number(raw)
                if value is not None:
                    exact.append(value)
        if aggregation == "max_agg":
            if whole:
                exact.append(Decimal(max(whole)))
            return max(exact) if exact else Decimal(0)
        return Decimal(sum(whole)) + sum(exact, Decimal(0))
    ordered = sorted(events, key=lambda e: Decimal(e["ts"]))
    values = [(e, _property_number(e["properties"].get(field))) for e in ordered]
    if aggregation == "latest_agg":
        present = [v for _, v in values if v is not None]
        return present[-1] if present else Decimal(0)
    if aggregation == "unique_count_agg":
        active: set[str] = set()
        for event in ordered:
            raw = event["properties"].get(field)
            if raw is None:
                continue
            if event["properties"].get("operation_type") == "remove":
                active.discard(str(raw))
            else:
                active.add(str(raw))
        return Decimal(len(active))
    return Decimal(0)


def _ranges_amount(units: Decimal, ranges: Iterable[Mapping[str, Any]], *, volume: bool) -> Decimal:
    """lago-api ``ChargeModels::VolumeService`` / ``GraduatedService`` (``AmountDetails::RangeGraduatedService``).

    Bounds are read as the decimals Lago reads (``BigDecimal(to_value.to_s)``: a JSON ``10.5`` bound is valid and
    not cut to 10). Since getlago/lago-api#5760 the flat amount of each range reached is billed without units too (so
    the first range's for 0 units). Volume: the range where ``from_value <= units.ceil`` and ``units <= to_value``
    bills all the units; none (negative units) bills nothing. Graduated: each range up to the first one whose
    ``to_value`` is null or reaches the units bills its units, ``min(units, to_value)`` less ``from_value - 1`` (all
    of them from the first range: negative units are billed there, as Lago does)."""
    total = Decimal(0)
    for rng in ranges:
        low = to_decimal(rng.get("from_value")) or Decimal(0)
        high = to_decimal(rng.get("to_value"))
        per_unit = to_decimal(rng.get("per_unit_amount")) or Decimal(0)
        flat = to_decimal(rng.get("flat_amount")) or Decimal(0)
        if volume:
            # VolumeService#matching_range: from_value <= units.ceil (100.5 units fall in the range from 101)
            if units.to_integral_value(rounding=ROUND_CEILING) >= low and (high is None or units <= high):
                return units * per_unit + flat
            continue
        top = high if high is not None and units >= high else units
        total += (top if low == 0 else top - low + 1) * per_unit + flat
        if high is None or high >= units:
            break
    return total


def _event_values(metric: JSON | None, events: Sequence[JSON]) -> list[Decimal]:
    """Each event's value in timestamp order, as lago-api's ``events_values`` / ``per_event_aggregation`` read them:
    1 per event for ``count_agg`` (and ``unique_count_agg``), the ``field_name`` property otherwise (an event without
    a number there is left out)."""
    ordered = sorted(events, key=lambda e: Decimal(e["ts"]))
    if metric is None or metric["aggregation_type"] in ("count_agg", "unique_count_agg"):
        return [Decimal(1)] * len(ordered)
    values = (_property_number(e["properties"].get(metric["field_name"])) for e in ordered)
    return [v for v in values if v is not None]


def _running_total(
    metric: JSON | None, units: Decimal, events: Sequence[JSON], per_events: int, per_total: Decimal
) -> list[Decimal]:
    """lago-api's aggregation ``running_total`` option: empty without free units; ``(1..units)`` for a count; for a
    sum, the cumulative sums of the first ``free_units_per_events`` events, else of the events until the sum passes
    ``free_units_per_total_aggregation``. Other aggregations give none (no free units)."""
    if per_events == 0 and per_total == 0:
        return []
    aggregation = "count_agg" if metric is None else metric["aggregation_type"]
    if aggregation in ("count_agg", "unique_count_agg"):
        return [Decimal(i) for i in range(1, int(units) + 1)]
    if aggregation != "sum_agg":
        return []
    values = _event_values(metric, events)
    totals: list[Decimal] = []
    total = Decimal(0)
    if per_events:
        for value in values[:per_events]:
            total += value
            totals.append(total)
        return totals
    for value in values:
        if per_total < total:
            break
        total += value
        totals.append(total)
    return totals


def _percentage_amount(
    properties: Mapping[str, Any],
    units: Decimal,
    events: Sequence[JSON],
    metric: JSON | None,
    count: int | None = None,
) -> Decimal:
    """lago-api ``ChargeModels::PercentageService`` (in currency units).

    * ``rate`` % of the units beyond the free units, plus ``fixed_amount`` for each event beyond the free events
      (none without units);
    * free units: the units of the first ``free_units_per_events`` events, or ``free_units_per_total_aggregation``
      (whichever comes first when both are given); free events: those, or the events whose running total stays
      under ``free_units_per_total_aggregation``;
    * ``per_transaction_min_amount`` / ``per_transaction_max_amount`` (a premium feature, applied here as on Lago
      Cloud): each event is then billed on its own, ``rate`` % of its value (after the free units) plus
      ``fixed_amount``, raised to the min or capped at the max; a free event is billed nothing.
    """
    rate = to_decimal(properties.get("rate")) or Decimal(0)
    fixed = to_decimal(properties.get("fixed_amount")) or Decimal(0)
    per_events = _ruby_int(properties.get("free_units_per_events"))
    per_total = to_decimal(properties.get("free_units_per_total_aggregation")) or Decimal(0)
    low = (
        to_decimal(properties.get("per_transaction_min_amount"))
        if _present(properties, "per_transaction_min_amount")
        else None
    )
    high = (
        to_decimal(properties.get("per_transaction_max_amount"))
        if _present(properties, "per_transaction_max_amount")
        else None
    )
    if low is not None or high is not None:
        free_events, free_amount = per_events, per_total
        total = Decimal(0)
        for value in _event_values(metric, events):
            if free_events > 0 or free_amount > 0:
                free_events -= 1
                if free_amount <= 0:
                    continue
                if free_amount > value:
                    free_amount -= value
                    continue
                value -= free_amount
                free_amount, free_events = Decimal(0), 0
            amount = value * rate / 100 + fixed
            if low is not None and amount < low:
                amount = low
            elif high is not None and amount > high:
                amount = high
            total += amount
        return total
    running = _running_total(metric, units, events, per_events, per_total)
    last = running[-1] if running else Decimal(0)
    if last == 0:
        free_units = Decimal(0)
    elif 0 < per_events < len(running):
        free_units = running[per_events - 1]
    elif per_total == 0 or last <= per_total:
        free_units = last
    else:
        free_units = per_total
    free_count = min((n for n in (per_events, sum(1 for t in running if t < per_total)) if n != 0), default=0)
    percentage = Decimal(0) if free_units > units else (units - free_units) * rate / 100
    count = len(events) if count is None else count  # (a unique count's: its values, as lago-api's result count)
    fixed_total = Decimal(0) if units == 0 or free_count >= count else (count - free_count) * fixed
    return percentage + fixed_total


def _graduated_percentage_amount(units: Decimal, ranges: Iterable[Mapping[str, Any]]) -> Decimal:
    """lago-api ``ChargeModels::GraduatedPercentageService``: each range bills ``rate`` % of the units that fall in
    it plus its ``flat_amount`` (the first range's without units too, since getlago/lago-api#5760), ranges counted as
    Lago's graduated ones (the first from 0, the next from the previous ``to_value`` + 1), up to the range holding
    the units."""
    total = Decimal(0)
    for rng in ranges:
        low = to_decimal(rng.get("from_value")) or Decimal(0)
        high = to_decimal(rng.get("to_value"))
        if high is not None and units >= high:
            in_range = high - (1 if low == 0 else low) + 1
        elif low == 0:
            in_range = units
        else:
            in_range = units - low + 1
        amount = in_range * (to_decimal(rng.get("rate")) or Decimal(0)) / 100
        total += amount + (to_decimal(rng.get("flat_amount")) or Decimal(0))
        if high is None or high >= units:
            break
    return total


#: The range of lago-api's bigint columns (amounts in cents)
_BIGINT = range(-(2**63), 2**63)
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]{1,20}")


def _bigint(value: Any) -> int | None:
    """An integer as Lago keeps it (a bigint column: amounts in cents, counts), from a seeding helper's field: an
    integer, an integral number (``250.0``) or integer text (``"1000"``), else ``None`` (a word, a fraction, a boolean,
    infinity, a list, a value past the column: int() raised on some, others were stored to break a later answer)."""
    if isinstance(value, bool):
        return None
    number: int
    if isinstance(value, int):
        number = value
    elif isinstance(value, (float, Decimal)):
        decimal = to_decimal(value)
        if decimal is None or abs(decimal) >= 2**63 or decimal != decimal.to_integral_value():
            return None  # (compared first: int() of 1e999999999 would build its billion digits)
        number = int(decimal)
    elif isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        return None
    return number if number in _BIGINT else None


def _holds_non_finite(value: Any) -> bool:
    """Whether ``value`` holds a float JSON cannot carry (NaN, Infinity: a seed file's ``1e400``), which every answer
    serving it would fail to encode. Walked without recursion, each container once."""
    pending = [value]
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, (Mapping, list, tuple)) and id(item) not in seen:  # (all alive: ids not reused)
            seen.add(id(item))
            pending.extend(item.values() if isinstance(item, Mapping) else item)
    return False


def _checked_seeded(kind: str, fields: Mapping[str, Any], integers: Iterable[str] = ()) -> dict[str, Any]:
    """A seeding helper's ``fields`` for an object of ``kind`` as the emulator can keep and serve them: the
    ``integers`` (amounts in cents, counts) as ints (see :func:`_bigint`), the texts it sorts or indexes as text and the
    lists it walks as lists of objects (any of them given as ``None`` left to its default), no NaN or Infinity
    anywhere; else Lago's 422 ``value_is_invalid`` naming each field (they raised ValueError or TypeError, or were
    stored to break later answers with a 500)."""
    checked = dict(fields)
    errors: dict[str, list[str]] = {}
    texts, lists = SEEDED_TEXTS.get(kind, ()), SEEDED_LISTS.get(kind, ())
    for key in (*texts, *lists, *integers):
        if key in checked and checked[key] is None:
            del checked[key]
    for key, value in checked.items():
        if key in texts:
            valid = isinstance(value, str)
        elif key in lists:
            valid = isinstance(value, list) and all(isinstance(item, Mapping) for item in value)
            valid = valid and not _holds_non_finite(value)
        elif key in integers:
            checked[key] = _bigint(value)
            valid = checked[key] is not None
        else:
            valid = not _holds_non_finite(value)
        if not valid:
            errors[key] = ["value_is_invalid"]
    if errors:
        raise validation_error(errors)
    return checked


def _valid_amount(value: Any) -> bool:
    """lago-api ``Validators::DecimalAmountService#valid_amount?``: a finite decimal (a number or numeric text), not
    negative."""
    amount = to_decimal(value)
    return amount is not None and amount >= 0


def _percentage_errors(model: str, properties: Mapping[str, Any], metric: JSON) -> list[str]:
    """The codes lago-api's ``Charges::Validators::PercentageService`` / ``GraduatedPercentageService`` add, which
    ``Charge#validate_charge_model`` reports as ``{"properties": [codes]}`` (the per-transaction bounds are checked,
    as on a premium (Cloud) organization)."""
    codes: list[str] = []
    if metric["aggregation_type"] == "latest_agg":
        codes.append("invalid_value")
    if model == "percentage":
        if not _valid_amount(properties.get("rate")):
            codes.append("invalid_rate")
        if properties.get("fixed_amount") is not None and not _valid_amount(properties["fixed_amount"]):
            codes.append("invalid_fixed_amount")
        per_events = properties.get("free_units_per_events")
        if per_events is not None and not (type(per_events) is int and per_events > 0):
            codes.append("invalid_free_units_per_events")
        per_total = properties.get("free_units_per_total_aggregation")
        if per_total is not None and not _valid_amount(per_total):
            codes.append("invalid_free_units_per_total_aggregation")
        bounds = ("per_transaction_min_amount", "per_transaction_max_amount")
        if any(_present(properties, key) and not _valid_amount(properties[key]) for key in bounds):
            codes.append("invalid_amount")
        low, high = (to_decimal(properties.get(key)) for key in bounds)
        if low is not None and high is not None and low > high:
            codes.append("per_transaction_max_lower_than_per_transaction_min")
        return codes
    ranges = properties.get("graduated_percentage_ranges")
    if not ranges or not isinstance(ranges, list):
        codes.append("missing_graduated_percentage_ranges")
        return codes
    expected = Decimal(0)
    for index, rng in enumerate(ranges):
        rng = _mapping(rng)
        if not _valid_amount(rng.get("flat_amount")):
            codes.append("invalid_amount")
        if not _valid_amount(rng.get("rate")):
            codes.append("invalid_rate")
        low, high = to_decimal(rng.get("from_value")), to_decimal(rng.get("to_value"))
        last = index == len(ranges) - 1
        # Validators::RangeBoundsValidator: each range starts where expected, the last one is open, the others end
        # after they start
        if low != expected or (high is not None if last else (high is None or high <= low)):
            codes.append("invalid_graduated_percentage_ranges")
        expected = (high or Decimal(0)) + 1
    return codes


_P = ParamSpec("_P")
_R = TypeVar("_R")
#: Enough digits for the sums and products of a fee: PostgreSQL's numeric and Ruby's BigDecimal keep every digit of
#: them, where Python's default context keeps 28 (a 30-digit sum of events lost its cents)
_FEE_CONTEXT = Context(prec=1000)


def _exact(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """``function`` computing in :data:`_FEE_CONTEXT` (units summed, amounts multiplied exactly)."""

    @functools.wraps(function)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with localcontext(_FEE_CONTEXT):
            return function(*args, **kwargs)

    return wrapper


@_exact
def _amount_details(charge: JSON, units: Decimal) -> JSON:
    """A charge fee's ``amount_details`` (lago-api ``ChargeModels::*Service#amount_details``): a package's free and
    paid units, package size and package price; empty for the other models here. ``PackageService#amount_details``
    gives the ``free_units`` property as it is (not capped by the units), ``"0.0"`` paid units when the free units
    cover the units, and zeros throughout without units."""
    if charge["charge_model"] != "package" or charge["filters"]:
        return {}
    if units == 0:
        return {"free_units": "0.0", "paid_units": "0.0", "per_package_size": 0, "per_package_unit_amount": "0.0"}
    properties = charge["properties"]
    free = Decimal(int(properties.get("free_units") or 0))
    return {
        "free_units": decimal_str(free),
        "paid_units": decimal_str(max(units - free, Decimal(0))),
        "per_package_size": int(properties.get("package_size") or 1),
        "per_package_unit_amount": decimal_str(to_decimal(properties.get("amount")) or Decimal(0)),
    }


def _json_number(value: Any) -> bool:
    """Whether a JSON value is a number (``10`` or ``10.0``; not ``"10"`` or ``true``)."""
    return type(value) in (int, float) and to_decimal(value) is not None


def _package_and_ranges_errors(model: str, properties: Mapping[str, Any]) -> list[str]:
    """The codes lago-api's ``Charges::Validators::PackageService`` / ``GraduatedService`` / ``VolumeService`` add
    (reported as ``{"properties": [codes]}``): a package's ``amount`` a decimal, its ``package_size`` an Integer
    above 0 and its ``free_units`` an Integer from 0 (a JSON ``10.0`` or ``"10"`` is not: Ruby's ``is_a?(Integer)``;
    a missing ``free_units``, which Lago refuses, is taken as 0 here); ranges given, their bounds JSON numbers (Lago
    cannot bill a text bound: ``range[:to_value] >= units`` raises). Bounds that do not follow each other are not
    checked here."""
    codes: list[str] = []
    if model == "package":
        if not _valid_amount(properties.get("amount")):
            codes.append("invalid_amount")
        size = properties.get("package_size")
        if not (type(size) is int and size > 0):
            codes.append("invalid_package_size")
        free = properties.get("free_units")
        if free is not None and not (type(free) is int and free >= 0):
            codes.append("invalid_free_units")
        return codes
    key = f"{model}_ranges"
    ranges = properties.get(key)
    if not ranges or not isinstance(ranges, list):
        return [f"missing_{key}"]
    for rng in ranges:
        rng = _mapping(rng)
        high = rng.get("to_value")
        if not _json_number(rng.get("from_value")) or not (high is None or _json_number(high)):
            return [f"invalid_{key}"]
    return codes


def _ruby_int(value: Any) -> int:
    """Ruby ``to_i`` of a property (``nil`` is 0)."""
    if value is None or isinstance(value, bool):
        return 0
    if isinstance(value, (int, float, Decimal)):
        return int(value)
    number = to_decimal(str(value).strip().split(".")[0] or "0")
    return int(number) if number is not None else 0


def _present(properties: Mapping[str, Any], key: str) -> bool:
    """Rails ``present?`` of a property: set, and not an empty (or blank) string."""
    value = properties.get(key)
    return value is not None and not (isinstance(value, str) and not value.strip())


_ROUNDINGS = {"round": ROUND_HALF_UP, "ceil": ROUND_CEILING, "floor": ROUND_FLOOR}


def _rounded(metric: Mapping[str, Any], units: Decimal) -> Decimal:
    """lago-api ``BillableMetrics::Aggregations::ApplyRoundingService``: the aggregation rounded as the metric says
    (``rounding_function`` round, ceil or floor, to ``rounding_precision`` digits: 0 by default, negative for tens,
    hundreds...), before any charge model prices it."""
    mode = _ROUNDINGS.get(str(metric.get("rounding_function") or ""))
    if mode is None:
        return units
    try:
        precision = int(metric.get("rounding_precision") or 0)
        with localcontext(Context(prec=max(28, len(units.as_tuple().digits) + abs(precision) + 2))):
            return units.quantize(Decimal(1).scaleb(-precision), rounding=mode)
    except (TypeError, ValueError, ArithmeticError):
        return units


def _charge_amount(
    charge_model: str,
    properties: Mapping[str, Any],
    units: Decimal,
    events: Sequence[JSON] = (),
    subunits: int = 100,
    metric: JSON | None = None,
    count: int | None = None,
) -> Decimal:
    """Amount in currency units (not cents) for ``units`` (aggregated from ``events`` of ``metric``) under one charge
    model; ``count``: the aggregation's count, when not its number of events (a unique count's values)."""
    if charge_model == "standard":
        return units * (to_decimal(properties.get("amount")) or Decimal(0))
    if charge_model == "package":
        size = int(properties.get("package_size") or 1)
        free = Decimal(int(properties.get("free_units") or 0))
        paid = max(units - free, Decimal(0))
        # PackageService: paid_units.fdiv(package_size).ceil, a Float division: 1e20 + 1 paid units in packages of
        # 1 are 1e20 packages, and 10.0000000000000001 in packages of 10 are 1 (a Float past 1e308, which Ruby
        # could not ceil, is counted exactly instead)
        quotient = float(paid) / size
        if math.isfinite(quotient):
            packages = Decimal(math.ceil(quotient))
        else:
            packages = (paid / Decimal(size)).to_integral_value(rounding=ROUND_CEILING)
        return packages * (to_decimal(properties.get("amount")) or Decimal(0))
    if charge_model == "graduated":
        return _ranges_amount(units, properties.get("graduated_ranges") or [], volume=False)
    if charge_model == "volume":
        return _ranges_amount(units, properties.get("volume_ranges") or [], volume=True)
    if charge_model == "percentage":
        return _percentage_amount(properties, units, events, metric, count)
    if charge_model == "graduated_percentage":
        return _graduated_percentage_amount(units, properties.get("graduated_percentage_ranges") or [])
    if charge_model == "dynamic":
        # DynamicService: the sum of the events' precise_total_amount_cents, in the currency's units (0 without units)
        if units == 0:
            return Decimal(0)
        total = sum((to_decimal(e.get("precise_total_amount_cents")) or Decimal(0) for e in events), Decimal(0))
        return total / Decimal(subunits)
    return Decimal(0)


#: The aggregations whose event store reads only the events with a number in the field (``numeric_property = true``
#: in lago-api's SumService, MaxService, LatestService and WeightedSumService)
_NUMERIC_AGGREGATIONS = frozenset({"sum_agg", "max_agg", "latest_agg", "weighted_sum_agg"})


def _bucket(
    metric: JSON,
    model: str,
    properties: Mapping[str, Any],
    events: Sequence[JSON],
    subunits: int,
    span: Span | None = None,
) -> JSON:
    """One charge bucket; ``amount_cents`` in the currency's subunits (``subunits`` per unit: 1 for JPY, 1000 for KWD,
    as Lago counts them). A weighted sum's ``total_aggregated_units`` is the plain sum of its events (lago-api's
    ``variation``, plus the previous periods' total for a recurring metric), its ``events_count`` the period's.

    A sum, max, latest or weighted sum reads only the events whose field is a number (lago-api's event store with
    ``numeric_property``): the others are not in its ``events_count``, nor in a percentage's events (its
    ``fixed_amount`` is per event counted) or a dynamic charge's amounts.

    Negative units (a sum of negative values) or a negative amount bill nothing: ``Fees::ChargeService#init_fee``
    sets the fee's amount and units to 0 then ("Prevent trying to create a fee with negative units or amount",
    getlago/lago-api#2966), its events count kept."""
    units = _rounded(metric, _aggregate(metric, events, span))
    total_units: Decimal | None = None
    if metric["aggregation_type"] in _NUMERIC_AGGREGATIONS:
        field = metric["field_name"]
        events = [e for e in events if _property_number(e["properties"].get(field)) is not None]
    # (a unique count's is its number of values: lago-api UniqueCountService sets the result's count to it, which the
    # fee keeps as its events_count and a percentage charge pays its fixed amount on)
    count = int(units) if metric["aggregation_type"] == "unique_count_agg" else len(events)
    if metric["aggregation_type"] == "weighted_sum_agg" and span is not None:
        total_units = _aggregate({**metric, "aggregation_type": "sum_agg"}, events)
        count = sum(1 for e in events if Decimal(e["ts"]) >= span.start)
    amount = _charge_amount(model, properties, units, events, subunits, metric, count)
    if units < 0 or amount < 0:
        units = amount = Decimal(0)
    return {
        "units": decimal_str(units),
        # (the fee's total_aggregated_units: the aggregation's, else its units)
        "total_aggregated_units": decimal_str(units if total_units is None else total_units),
        "events_count": count,
        "amount_cents": cents(amount * subunits),
        "pricing_unit_details": None,
        "presentation_breakdowns": [],
    }


ALL_FILTER_VALUES = "__ALL_FILTER_VALUES__"


def _filter_match(charge_filter: Mapping[str, Any], event: JSON, skip: frozenset[str] = frozenset()) -> bool:
    """Whether ``event`` matches the filter's values, its keys in ``skip`` aside."""
    for key, values in charge_filter["values"].items():
        if key in skip:
            continue
        value = event["properties"].get(key)
        if value is None:
            return False
        if ALL_FILTER_VALUES not in values and str(value) not in values:
            return False
    return True


def _filters_overlap(first: Mapping[str, Any], second: Mapping[str, Any]) -> bool:
    """Whether one event can match both filters: each key they share has a value in common."""
    for key, values in first["values"].items():
        other = second["values"].get(key)
        if other is None or ALL_FILTER_VALUES in values or ALL_FILTER_VALUES in other:
            continue
        if not {str(v) for v in values} & {str(v) for v in other}:
            return False
    return True


def _filter_buckets(filters: Sequence[JSON], events: Sequence[JSON], replaced: frozenset[str]) -> list[list[JSON]]:
    """The events each filter's fee aggregates, as lago-api selects them: its ``matching_filters`` minus its
    ``ignored_filters`` (the filters taking precedence over it, here the one with the most keys then the first,
    that overlap its own values). ``replaced``: the keys a group filter gives (``aggregation_filters`` merges
    ``filter_by_group`` into ``matching_filters`` after the ignored filters were computed, so the group's values
    replace the filter's own on those keys; ``events`` already match the group). Without replaced keys, each event
    is in the bucket of the one filter that wins it."""
    size = [len(f["values"]) for f in filters]
    buckets: list[list[JSON]] = []
    for i, charge_filter in enumerate(filters):
        ignored = [
            other
            for j, other in enumerate(filters)
            if (size[j] > size[i] or (size[j] == size[i] and j < i)) and _filters_overlap(other, charge_filter)
        ]
        buckets.append(
            [
                e
                for e in events
                if _filter_match(charge_filter, e, replaced) and not any(_filter_match(g, e) for g in ignored)
            ]
        )
    return buckets


def _filters_usage(
    charge: JSON,
    metric: JSON,
    events: Sequence[JSON],
    subunits: int,
    replaced: frozenset[str] = frozenset(),
    span: Span | None = None,
) -> tuple[list[JSON], Decimal, int, int, Decimal]:
    """Per-filter buckets (Lago drops the default bucket from ``filters``), and the units, events count and cents of
    all the buckets summed (``ChargeUsageSerializer`` sums its fees: a ``max_agg`` charge with filters reports the sum
    of each bucket's maximum; an event in two buckets, see :func:`_filter_buckets`, counts twice)."""
    model = charge["charge_model"]
    if not charge["filters"]:
        bucket = _bucket(metric, model, charge["properties"], events, subunits, span)
        units = Decimal(bucket["units"])
        total_units = Decimal(bucket["total_aggregated_units"])
        return [], units, int(bucket["events_count"]), int(bucket["amount_cents"]), total_units
    default = [e for e in events if not any(_filter_match(f, e) for f in charge["filters"])]
    out = []
    units = total_units = Decimal(0)
    count = total = 0
    for charge_filter, bucket_events in zip(
        charge["filters"], _filter_buckets(charge["filters"], events, replaced), strict=True
    ):
        properties = charge_filter["properties"] or charge["properties"]
        bucket = _bucket(metric, model, properties, bucket_events, subunits, span)
        units += Decimal(bucket["units"])
        total_units += Decimal(bucket["total_aggregated_units"])
        count += int(bucket["events_count"])
        total += int(bucket["amount_cents"])
        bucket.pop("presentation_breakdowns")
        out.append(
            {
                **bucket,
                "invoice_display_name": charge_filter["invoice_display_name"],
                "values": copy.deepcopy(charge_filter["values"]),
                "presentation_breakdowns": [],
            }
        )
    rest = _bucket(metric, model, charge["properties"], default, subunits, span)
    units += Decimal(rest["units"])
    total_units += Decimal(rest["total_aggregated_units"])
    count += int(rest["events_count"])
    total += int(rest["amount_cents"])
    return out, units, count, total, total_units


def _sum_filters(into: list[JSON], more: Sequence[JSON]) -> None:
    """Add one group's filter buckets to the charge's (``filters(fees)`` sums a filter's fees over the groups)."""
    for mine, theirs in zip(into, more, strict=True):
        for key in ("units", "total_aggregated_units"):
            mine[key] = decimal_str(Decimal(mine[key]) + Decimal(theirs[key]))
        mine["events_count"] += theirs["events_count"]
        mine["amount_cents"] += theirs["amount_cents"]


def _enriched_at(event: JSON) -> datetime:
    """When the emulator stored (enriched) the event: its ingestion time (to the millisecond)."""
    return parse_datetime(_ingested_at(event)) or datetime.min.replace(tzinfo=UTC)


def _ingested_at(event: JSON) -> str:
    """The event's ingestion time, ``iso_ms`` text (its text orders it)."""
    return str(event.get("ingested_at") or event["created_at"])


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = Decimal("0.000001")


def _epoch(moment: datetime) -> Decimal:
    """``moment`` in Unix seconds, exact to the microsecond (a float is not)."""
    delta = moment - _EPOCH
    return Decimal(delta.days * 86400 + delta.seconds) + Decimal(delta.microseconds) * _MICROSECOND


def _floor_us(seconds: Decimal) -> Decimal:
    """Unix ``seconds`` cut to the microsecond (Rails writing a ``timestamp(6)`` column)."""
    return seconds.quantize(_MICROSECOND, rounding=ROUND_FLOOR)


def _text(value: Any) -> str:
    """A JSON property value as ClickHouse keeps it in a ``Map(String, String)``: a string as it is, anything else as
    its JSON text (``5``, ``1.5``, ``true``, ``{"a":1}``), ``null`` as the empty string."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _map_text(properties: Mapping[str, Any]) -> dict[str, str]:
    """``properties`` read back from a ClickHouse ``Map(String, String)`` column."""
    return {str(key): _text(value) for key, value in properties.items()}


def _group_text(value: Any) -> str | None:
    """A property value as lago-api compares it with a group filter value (``properties->>key``: ``true``, ``5``,
    ``u1``); a missing one is SQL ``NULL``, which matches nothing."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _group_values(value: Any) -> set[str | None]:
    """A group filter value as lago-api matches it: ``Array(v).map(&:to_s)`` (``nil`` alone is ``[]``, ``nil`` in a
    list is ``""``)."""
    if value is None:
        return set()
    items = value if isinstance(value, (list, tuple, set)) else [value]
    return {"" if x is None else _group_text(x) for x in items}


@_exact
def _charge_usage(
    charge: JSON,
    metric: JSON,
    events: Sequence[JSON],
    currency: str,
    groups: Mapping[str, Any],
    span: Span | None = None,
) -> JSON:
    subunits = subunits_per_unit(currency)
    keys = [str(k) for k in charge["properties"].get("pricing_group_keys") or []]
    replaced: frozenset[str] = frozenset()
    if groups:
        # UsageFilters keeps each value as Array(v): an event matches when its property is any of them. The filtered
        # keys leave the charge's grouping (Fees::ChargeService#aggregation_filters: "filters[:grouped_by]&.delete"),
        # so the usage stays per the other keys only, or ungrouped (no grouped_usage) when none is left
        wanted = {str(k): _group_values(v) for k, v in groups.items()}
        events = [e for e in events if all(_group_text(e["properties"].get(k)) in vals for k, vals in wanted.items())]
        keys = [k for k in keys if k not in wanted]
        replaced = frozenset(wanted)
    grouped_usage: list[JSON] = []
    by_group: dict[tuple[str | None, ...], list[JSON]] = {}
    for event in events if keys else ():
        raw = tuple(event["properties"].get(k) for k in keys)
        by_group.setdefault(tuple(None if v is None else str(v) for v in raw), []).append(event)
    if by_group:
        filters: list[JSON] = []
        units_total, events_count, amount_cents, aggregated_total = Decimal(0), 0, 0, Decimal(0)
        for group, group_events in sorted(by_group.items(), key=lambda kv: [v or "" for v in kv[0]]):
            group_filters, units, count, amount, aggregated = _filters_usage(
                charge, metric, group_events, subunits, replaced, span
            )
            if grouped_usage:
                _sum_filters(filters, group_filters)
            else:
                filters = copy.deepcopy(group_filters)
            units_total += units
            aggregated_total += aggregated
            events_count += count
            amount_cents += amount
            grouped_usage.append(
                {
                    "amount_cents": amount,
                    "events_count": count,
                    "units": decimal_str(units),
                    "total_aggregated_units": decimal_str(aggregated),
                    "pricing_unit_details": None,
                    "grouped_by": dict(zip(keys, group, strict=True)),
                    "filters": group_filters,
                    "presentation_breakdowns": [],
                }
            )
    else:
        filters, units_total, events_count, amount_cents, aggregated_total = _filters_usage(
            charge, metric, events, subunits, replaced, span
        )
    return {
        "units": decimal_str(units_total),
        "total_aggregated_units": decimal_str(aggregated_total),
        "events_count": events_count,
        "amount_cents": amount_cents,
        "amount_currency": currency,
        "pricing_unit_details": None,
        "charge": {
            "lago_id": charge["lago_id"],
            "code": charge["code"],
            "charge_model": charge["charge_model"],
            "invoice_display_name": charge["invoice_display_name"],
        },
        "billable_metric": {
            "lago_id": metric["lago_id"],
            "name": metric["name"],
            "code": metric["code"],
            "aggregation_type": metric["aggregation_type"],
        },
        "filters": filters,
        "grouped_usage": grouped_usage,
        "presentation_breakdowns": [],
    }
