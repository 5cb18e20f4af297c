"""The org-level billing service: the seed's ``lago_integration`` API over :class:`LagoClient`.

Customers are keyed by org id (``external_id = org_id``); the user who created the org is kept in metadata;
the org's subscription ``external_id`` comes from ``LAGO_SUBSCRIPTION_ID_TEMPLATE``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import inspect
import logging
import numbers
import re
import threading
import time
import uuid
import zoneinfo
from collections.abc import AsyncIterator, Collection, Mapping
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from cachetools import TTLCache

from . import _checks as checks
from ._client import JSON, LagoClient, _only_existing_keys, check_billing_time
from ._errors import (
    ConfigurationError,
    InvalidIdentifierError,
    InvalidRequestError,
    LagoAPIError,
    LagoAuthenticationError,
    LagoIntegrationError,
    LagoNotFoundError,
    LagoUnavailableError,
    LagoValidationError,
    no_such_route,
    traceback_text,
)
from ._events import event_payload
from ._forks import track
from ._gate import QuotaDecision, QuotaGateProtocol
from ._ids import _FORBIDDEN, validate_id
from ._quota import QuotaGate, _Decision
from ._settings import BillingSettings, masked_url

if TYPE_CHECKING:
    from ._delivery import EventPipeline

__all__ = [
    "METADATA_BILLING_TYPE",
    "METADATA_CREATED_BY",
    "METADATA_MIGRATED_FROM",
    "OrgBilling",
    "check_metadata",
    "customer_metadata",
    "metadata_update_items",
]

logger = logging.getLogger("lago_org_billing.billing")

#: Metadata keys the package writes on org customers (each fits Lago's 20-character key limit).
METADATA_CREATED_BY = "created_by_user_id"
METADATA_BILLING_TYPE = "billing_type"
METADATA_MIGRATED_FROM = "migrated_from_user"
ORGANIZATION = "organization"

#: Lago's customer metadata limits (``Metadata::CustomerMetadata``).
MAX_METADATA_ITEMS = 5
MAX_METADATA_KEY = 20
MAX_METADATA_VALUE = 100


class OrgBilling:
    """Per-organization billing on Lago, with the names of the seed's ``lago_integration`` module.

    ::

        async with OrgBilling() as billing:  # settings from the environment
            await billing.subscribe_org_to_plan("org_123", "starter", "Acme", "billing@acme.test", user_id="u_1")

    **Parameters:**

    * **settings** - *(optional)* :class:`BillingSettings`, read from the environment when omitted.
    * **client** - *(optional)* a :class:`LagoClient` to use (not closed by this object).
    * **transport** - *(optional)* an httpx transport for the client this object creates (tests).
    * **pipeline** - *(optional)* the background ``EventPipeline`` (e.g. ``middleware.pipeline``) that
      :meth:`record_usage_nowait` and :meth:`record_api_call_nowait` hand events to.
    * **quota** - *(optional)* the quota gate (e.g. ``middleware.quota``) to count the usage recorded here in, at
      once, as the middleware counts its requests': an event of ``LAGO_EVENT_CODE`` is one call, and the
      ``total_tokens`` of the gate's token metric count as tokens. Without it, the gate sees that usage only at its
      next snapshot of Lago (``LAGO_USAGE_CACHE_TTL``), and an org can exceed its limits meanwhile.
    * **middleware** - *(optional)* the :class:`OrgBillingMiddleware` instance served (``asgi_app =
      OrgBillingMiddleware(app)``), instead of ``pipeline`` and ``quota``: its *current* pipeline and gate are used,
      which it makes anew each time the app is served again (a second lifespan), and its settings when ``settings``
      is omitted. The client stays this object's own.

    With a gate (``quota`` or the middleware's), a subscription made, changed or ended here drops the org's cached
    quota state in it, as ``billing_routes()`` does: its next request is decided on its new plan, not on the old one
    for up to ``LAGO_USAGE_CACHE_TTL`` (an org answered 402 before it had a subscription, served at once once it has).
    """

    def __init__(
        self,
        settings: BillingSettings | None = None,
        *,
        client: LagoClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        pipeline: EventPipeline | None = None,
        quota: QuotaGateProtocol | None = None,
        middleware: Any = None,
    ) -> None:
        if middleware is not None and (pipeline is not None or quota is not None):
            raise ConfigurationError(
                "Give OrgBilling either middleware=asgi_app (its current pipeline and gate) or pipeline=/quota=, "
                "not both."
            )
        _check_billing_arguments(settings, client, pipeline, quota, middleware)
        if client is not None and transport is not None:  # (the transport of a client made here: none is)
            raise ConfigurationError(
                "OrgBilling(transport=...) is the transport of the client OrgBilling makes; with client= given it "
                "makes none and the transport would go unused: give it to your LagoClient(settings, transport=...)."
            )
        self._middleware = middleware
        self._pipeline = pipeline
        self._quota = quota
        if settings is None and client is None and middleware is not None:
            settings = middleware.settings
        # (a caller-given transaction id's first timestamp is the client's memory: LagoClient._first_timestamp)
        # caller-given events counted in the quota gate (subscription, transaction id, timestamp, code), recorded or
        # queued: one recorded or queued again (a caller's own retry) is not counted again, as Lago keeps it once
        self._queued: TTLCache[tuple[str, str, str, str], bool] = TTLCache(maxsize=100_000, ttl=86_400)
        # record_*_nowait is sync and called from thread pools (sync endpoints): the cache is not thread-safe (two
        # threads evicting at once raise KeyError out of the call, the event never queued)
        self._queued_lock = threading.Lock()
        # and so are the quota gate's in-process records those calls count in: see _count
        self._count_lock = threading.Lock()
        track(self)  # (a lock held by another thread at a fork would stay held in the child)
        if client is not None:
            self.client = client
            self.settings = settings if settings is not None else client.settings
            self._owns_client = False
        else:
            self.settings = settings if settings is not None else BillingSettings.from_env()
            self.client = LagoClient(self.settings, transport=transport)
            self._owns_client = True

    def _forked(self) -> None:
        self._queued_lock = threading.Lock()
        self._count_lock = threading.Lock()

    @property
    def pipeline(self) -> EventPipeline | None:
        """The background pipeline of :meth:`record_usage_nowait`: the one given, else the middleware's current one."""
        if self._pipeline is None and self._middleware is not None:
            return self._middleware.pipeline  # type: ignore[no-any-return]
        return self._pipeline

    @pipeline.setter
    def pipeline(self, pipeline: EventPipeline | None) -> None:
        self._pipeline = pipeline

    @property
    def quota(self) -> QuotaGateProtocol | None:
        """The quota gate usage recorded here is counted in: the one given, else the middleware's current one."""
        if self._quota is None and self._middleware is not None:
            return self._middleware.quota  # type: ignore[no-any-return]
        return self._quota

    @quota.setter
    def quota(self, quota: QuotaGateProtocol | None) -> None:
        self._quota = quota

    async def __aenter__(self) -> OrgBilling:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the Lago client if this object created it."""
        if self._owns_client:
            await self.client.aclose()

    @contextlib.asynccontextmanager
    async def _changing(self, org_id: str) -> AsyncIterator[None]:
        """Around the writes changing the org's subscription in Lago: the gate's state of the org invalidated after
        them, whether Lago answered or not. An answer lost (``LagoUnavailableError`` after Lago applied an upgrade)
        left the org decided on its old plan up to ``LAGO_USAGE_CACHE_TTL``; an invalidation too many costs one
        refresh. Reads before the writes stay outside: one failing (Lago down) changed nothing, and the gate keeps
        serving on the snapshot it has. Shielded: a write cancelled once Lago applied it (the caller's timeout, a task
        group cancelled) is an answer lost too, and cancelled the invalidation was cut at its first await (with the
        gate on Redis, the fleet's: an upgraded org refused on its old plan). Redis's own timeouts bound it."""
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await self._invalidate(org_id)

    async def _invalidate(self, org_id: str) -> None:
        """After the org's subscription or plan changed here: drop its cached quota state in the gate this object
        knows (``quota=``, or the middleware's current one), if it can (``invalidate``), as ``billing_routes()`` does.
        Without it, an org refused (402) until it was subscribed stayed refused up to ``LAGO_USAGE_CACHE_TTL`` when no
        webhook reaches the app. A failure (Redis unreachable) is logged, never raised: the change is made in Lago,
        and the gate catches up at the org's next refresh or Lago's webhook."""
        invalidate = getattr(self.quota, "invalidate", None)
        if not callable(invalidate):
            return
        try:
            done = invalidate(org_id)
            if inspect.isawaitable(done):  # (a test double's plain MagicMock answers a non-awaitable)
                await done
        except Exception as exc:
            # (its traceback as text, not the exception: the frames of the gate's Redis client held its password)
            logger.warning(
                "Could not invalidate the quota state of org %s after its subscription changed: the gate decides on "
                "its old plan until its next refresh (LAGO_USAGE_CACHE_TTL) or Lago's webhook\n%s",
                org_id,
                traceback_text(exc),
            )

    def subscription_id(self, org_id: str) -> str:
        """The Lago subscription ``external_id`` of ``org_id``."""
        return validate_id(self.settings.subscription_id_for(validate_id(org_id, "org_id")), "subscription id")

    # --------------------------------------------------------------- customers

    async def create_org_customer(
        self,
        org_id: str,
        org_name: str,
        email: str | None = None,
        user_id: str | int | uuid.UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> JSON:
        """Create (or bring up to date) the Lago customer of an org: ``external_id = org_id``, with
        ``created_by_user_id`` and ``billing_type=organization`` in metadata.

        Calling it again is safe: existing metadata items are kept and updated, never dropped.
        ``user_id`` is text, or an integer or a UUID kept as its text (as :meth:`record_api_call` writes it).
        ``fields`` are other Lago customer fields (``currency``, ``country``...).
        """
        validate_id(org_id, "org_id")
        wanted = _package_metadata(user_id, metadata)
        check_metadata(wanted)
        existing = await self.get_customer(org_id)
        if existing is None:
            customer = {**fields, "external_id": org_id, "name": _name(org_name)}
            if email is not None:
                customer["email"] = _email(email)
            customer["metadata"] = [
                {"key": key, "value": value, "display_in_invoice": False} for key, value in wanted.items()
            ]
            try:
                return await self.client.upsert_customer(customer)
            except LagoValidationError as exc:
                # Created meanwhile (a concurrent call, or this call's own retry after a lost answer): its metadata
                # keys exist now, and items without their ids are refused; or the other call's insert won the race
                # (Lago's unique index: external_id value_already_exist). Bring that customer up to date instead.
                if not (_only_existing_keys(exc.details) or exc.details == {"external_id": ["value_already_exist"]}):
                    raise
                existing = await self.get_customer(org_id)
                if existing is None:
                    raise
        if METADATA_CREATED_BY in customer_metadata(existing):  # who created it stays who created it
            wanted.pop(METADATA_CREATED_BY, None)
        return await self._update(existing, org_name, email, wanted, fields)

    async def get_customer(self, org_id: str) -> JSON | None:
        """The org's Lago customer, or ``None`` when it has none. An ``org_id`` Lago cannot address raises
        :class:`InvalidIdentifierError` naming ``org_id`` (the client's check named its own ``customer external_id``,
        an argument the caller never wrote)."""
        validate_id(org_id, "org_id")
        try:
            return await self.client.get_customer(org_id)
        except LagoNotFoundError as exc:
            if no_such_route(exc):  # a LAGO_API_URL Lago is not served under: not "this org has no customer"
                raise
            return None

    async def update_org_customer(
        self,
        org_id: str,
        org_name: str | None = None,
        email: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> JSON:
        """Update an org's customer. ``metadata`` is merged into the existing items (a value of ``None``
        removes that key); nothing else is dropped. Raises :class:`LagoNotFoundError` if the org has no
        customer."""
        existing = await self.get_customer(org_id)
        if existing is None:
            raise LagoNotFoundError(
                f"Org {org_id!r} has no Lago customer yet: call create_org_customer first.",
                status=404,
                code="customer_not_found",
            )
        return await self._update(existing, org_name, email, _metadata_mapping(metadata), fields)

    async def get_or_create_customer(
        self,
        org_id: str,
        org_name: str,
        email: str | None = None,
        user_id: str | int | uuid.UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> JSON:
        """The org's customer, created first when it does not exist (an existing one is left as it is)."""
        existing = await self.get_customer(org_id)
        if existing is not None:
            return existing
        return await self.create_org_customer(org_id, org_name, email, user_id, metadata)

    async def is_org_customer(self, external_id: str) -> bool:
        """True when ``external_id`` is an org-keyed customer (``billing_type=organization`` in its metadata);
        False for user-keyed (legacy) or unknown customers, and for an id no org customer can have (a legacy
        customer keyed by an email: ``alice@example.com``; Lago cannot address it in a URL path, and
        ``create_org_customer`` refuses such ids).

        Read from Lago, not from the id's format as the seed's was (an ``org_`` prefix): the package takes any id Lago
        takes, so an org's id and a legacy user's can look alike; the marker every org customer gets here
        (``create_org_customer``, ``subscribe_org_to_plan``, the migration) is what tells them apart. Await it: the
        seed's ``if is_org_customer(id):`` without ``await`` is always true (a coroutine)."""
        if isinstance(external_id, str) and external_id and _unaddressable(external_id):
            return False
        validate_id(external_id, "external_id")  # (padded, empty, too long, not text: said with this argument's name)
        customer = await self.get_customer(external_id)
        if customer is None:
            return False
        return customer_metadata(customer).get(METADATA_BILLING_TYPE) == ORGANIZATION

    async def _update(
        self,
        existing: JSON,
        org_name: str | None,
        email: str | None,
        changes: Mapping[str, Any],
        fields: Mapping[str, Any],
        _retried: bool = False,
    ) -> JSON:
        customer: JSON = {**fields, "external_id": existing["external_id"]}
        if org_name is not None:
            customer["name"] = _name(org_name)
        if email is not None:
            customer["email"] = _email(email)
        if changes:
            current = customer_metadata(existing)
            merged = dict(current)
            for key, value in changes.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            check_metadata(merged)
            if merged != current:
                customer["metadata"] = metadata_update_items(existing, merged)
        if len(customer) == 1:  # nothing to change
            return existing
        try:
            return await self.client.upsert_customer(customer)
        except LagoValidationError as exc:
            # A key this adds exists now: the client's own retry after a lost answer (Lago applied the first), or a
            # concurrent update. Read the customer again and send what is still to change, with the items' ids.
            if _retried or not _only_existing_keys(exc.details):
                raise
            fresh = await self.get_customer(existing["external_id"])
            if fresh is None:
                raise
            return await self._update(fresh, org_name, email, changes, fields, _retried=True)

    # ----------------------------------------------------------- subscriptions

    async def create_subscription(
        self,
        org_id: str,
        plan_code: str,
        billing_time: str = "calendar",
        subscription_at: dt.datetime | dt.date | str | None = None,
        **fields: Any,
    ) -> JSON:
        """Subscribe the org's customer to ``plan_code`` (subscription ``external_id`` from the template).

        Idempotent: the same plan returns the existing subscription (one made with ``plan_overrides`` too, when no
        ``plan_overrides`` are given). A different plan is an upgrade or a
        downgrade, as Lago decides from the plans' amounts (see :meth:`change_plan`).

        ``subscription_at`` and ``ending_at`` take aware datetimes, ISO 8601 strings or dates: a date (or a
        ``YYYY-MM-DD`` string) is that day's 00:00 in the customer's time zone (Lago's billing days are the
        customer's; one more call reads it), UTC for an org without a customer yet.

        An org whose subscription ``external_id`` another Lago customer's active subscription holds is refused before
        anything is sent (:class:`LagoValidationError`, as Lago's 422, saying which customer and what to do)."""
        validate_id(org_id, "org_id")
        _check_subscription_arguments(subscription_at, fields, billing_time)
        plan_code = validate_id(plan_code, "plan_code")
        current = await self.client.get_current_subscription(self.subscription_id(org_id))
        return await self._create_subscription(org_id, plan_code, billing_time, subscription_at, current, fields)

    async def _create_subscription(
        self,
        org_id: str,
        plan_code: str,
        billing_time: str,
        subscription_at: dt.datetime | dt.date | str | None,
        current: JSON | None,
        fields: dict[str, Any],
    ) -> JSON:
        """:meth:`create_subscription`, its arguments checked, ``current`` the subscription under the org's id Lago
        has (``get_current_subscription``, read by the caller). The gate is invalidated around the write (see
        :meth:`_changing`), and when the org has the plan already (the gate may have refused it until now); not
        after the read of the customer's time zone, which writes nothing: failing (Lago down), it dropped the org's
        state, and its requests, served on their snapshot, waited for Lago (refused with LAGO_FAIL_OPEN=false)."""
        held = self._held_by_another(org_id, current)
        if held is not None:  # (Lago would refuse it: 422 external_id value_already_exist)
            raise held
        # (with plan_overrides, not resent by the client once sent: Lago would read it as a plan change) what there
        # is before, so that a create whose answer is lost can be told from what Lago had
        before = current
        if fields.get("plan_overrides") is None:
            # Lago compares plan *ids*: a subscription made with plan_overrides is on a copy of the plan (same code,
            # its own id), so the same plan again would be an "upgrade" replacing it (billed at once, at list price)
            # or a downgrade to list price. The same plan code is the subscription the org has.
            if (
                current is not None
                and current.get("plan_code") == plan_code
                and current.get("external_customer_id") == org_id  # (another customer's pending one: not the org's)
            ):
                await self._invalidate(org_id)
                return current
        zone: dt.tzinfo = dt.timezone.utc
        if any(_is_day(value) for value in (subscription_at, fields.get("ending_at"))):
            zone = _customer_zone(await self.get_customer(org_id))
        if fields.get("ending_at") is not None:
            fields["ending_at"] = _iso(fields["ending_at"], "ending_at", zone)
        async with self._changing(org_id):
            try:
                return await self.client.create_subscription(
                    external_customer_id=org_id,
                    plan_code=plan_code,
                    external_id=self.subscription_id(org_id),
                    billing_time=billing_time,
                    subscription_at=_iso(subscription_at, "subscription_at", zone),
                    **fields,
                )
            except LagoUnavailableError:
                if fields.get("plan_overrides") is None:  # (resent by the client: a re-run converges)
                    raise
                made = await self._made_behind_lost_answer(org_id, plan_code, before)
                if made is None:
                    raise
                return made
            except LagoValidationError as exc:
                if exc.details == {"subscription": ["subscription_incomplete"]}:  # (no field of ours at fault)
                    external_id = self.subscription_id(org_id)
                    waiting = await self._incomplete(external_id) or {}
                    raise _waiting_for_payment(
                        external_id, waiting, "another subscription under its id", "change its plan then"
                    ) from None
                if exc.details != {"external_id": ["value_already_exist"]}:
                    raise
                # (the caller sent no external_id: Lago's "fix the fields" is no help) another customer holds it
                held = await self._held_elsewhere(org_id, exc)
                if held is None:
                    raise
                raise held from None

    async def _made_behind_lost_answer(self, org_id: str, plan_code: str, before: JSON | None) -> JSON | None:
        """After a create with ``plan_overrides`` whose answer was lost: the org's subscription Lago made of it (a new
        one on ``plan_code``, or ``before`` with a downgrade to it scheduled), else ``None`` (nothing made, or Lago
        unreadable: a resend might apply it twice)."""
        try:
            after = await self.client.get_current_subscription(self.subscription_id(org_id))
        except LagoIntegrationError:
            return None
        if after is None or after.get("external_customer_id") != org_id:
            return None
        was = before or {}
        made = after.get("plan_code") == plan_code and after.get("lago_id") != was.get("lago_id")
        scheduled = (
            after.get("lago_id") == was.get("lago_id")
            and after.get("next_plan_code") == plan_code
            and was.get("next_plan_code") != plan_code
        )
        if not (made or scheduled):
            return None
        logger.info(
            "Subscription %s was made by Lago although its answer was lost; answered as made", after.get("external_id")
        )
        return after

    async def _held_elsewhere(self, org_id: str, exc: LagoValidationError) -> LagoValidationError | None:
        """Lago's refusal ``exc`` of the org's subscription ``external_id`` (``value_already_exist``), restated with
        the customer that holds it and what to do; ``None`` when the org itself holds it."""
        external_id = self.subscription_id(org_id)
        try:
            holder = await self.client.get_current_subscription(external_id)
        except LagoIntegrationError:
            holder = None
        owner = (holder or {}).get("external_customer_id")
        if owner == org_id:
            return None
        return exc._restated(  # type: ignore[return-value]
            LagoValidationError, self._held_message(org_id, holder if owner is not None else None)
        )

    def _held_by_another(self, org_id: str, current: JSON | None) -> LagoValidationError | None:
        """The error of subscribing an org whose subscription ``external_id`` another customer's active subscription
        holds (``current``, as read): Lago refuses it with ``422 external_id value_already_exist``, so it is refused
        here, before anything is written (a pending one does not hold the id: Lago subscribes the org beside it)."""
        if current is None or current.get("status") == "pending":
            return None
        owner = current.get("external_customer_id")
        if owner is None or owner == org_id:
            return None
        return LagoValidationError(
            self._held_message(org_id, current) + " Nothing was written to Lago.",
            status=422,
            code="validation_errors",
            details={"external_id": ["value_already_exist"]},
            error="Unprocessable Entity",
            method="POST",
            path="/api/v1/subscriptions",
        )

    def _held_message(self, org_id: str, holder: Mapping[str, Any] | None) -> str:
        """Why the org cannot be subscribed: ``holder`` (``None``: unknown) holds its subscription id; what to do."""
        external_id = self.subscription_id(org_id)
        who = (
            f"Lago customer {holder.get('external_customer_id')!r} ({holder.get('status')}, plan "
            f"{holder.get('plan_code')!r})"
            if holder is not None
            else "another Lago customer"
        )
        return (
            f"Org {org_id!r} cannot be subscribed: its subscription external_id {external_id!r} "
            f"(LAGO_SUBSCRIPTION_ID_TEMPLATE {self.settings.subscription_id_template!r}) is held by {who}, and Lago "
            "cannot move a subscription to another customer. Terminate that subscription first (await "
            f"billing.client.terminate_subscription({external_id!r})), or map orgs to subscription ids no other "
            "customer uses (LAGO_SUBSCRIPTION_ID_TEMPLATE, e.g. '{org_id}_main')."
        )

    def _check_owner(self, org_id: str, subscription: Mapping[str, Any], what: str) -> None:
        """Raise :class:`InvalidRequestError` unless ``subscription`` (found under the org's subscription id, or one
        given) is the org's: another customer's (a legacy user's named like the org) is never read, changed nor ended
        as the org's."""
        owner = subscription.get("external_customer_id")
        if owner is not None and owner != org_id:
            raise InvalidRequestError(
                f"Subscription {subscription.get('external_id')!r} belongs to customer {owner!r}, not org {org_id!r}: "
                f"{what}. Lago keys one active subscription external_id to one customer: end that one on its customer "
                "first (LagoClient.terminate_subscription), or map orgs to ids no other customer uses "
                "(LAGO_SUBSCRIPTION_ID_TEMPLATE, e.g. '{org_id}_main')."
            )

    async def subscribe_org_to_plan(
        self,
        org_id: str,
        plan_code: str,
        org_name: str,
        email: str | None = None,
        user_id: str | int | uuid.UUID | None = None,
        **subscription_fields: Any,
    ) -> JSON:
        """One call to set an org up: its customer (created if needed) and its subscription.

        An existing customer is completed, never overwritten: a name, email, org marker (``billing_type``) or creator
        it lacks is set (Lago creates a bare customer when a subscription is created for an unknown one).
        Returns ``{"customer": ..., "subscription": ...}``.

        Checked before anything is written, so that a refused setup leaves no customer behind: the arguments, and the
        org's subscription ``external_id`` (another customer's active subscription holding it raises
        :class:`LagoValidationError`, as Lago's 422 would once the customer was written, naming that customer)."""
        validate_id(org_id, "org_id")
        plan_code = validate_id(plan_code, "plan_code")
        user_id = _attribution_text("user_id", user_id, ids=True)  # (before any call, as the other arguments)
        billing_time = subscription_fields.pop("billing_time", "calendar")
        subscription_at = subscription_fields.pop("subscription_at", None)
        _check_subscription_arguments(subscription_at, subscription_fields, billing_time)
        # (the read create_subscription makes, made first: the org's own subscription, or the id held by another)
        subscribed = await self.client.get_current_subscription(self.subscription_id(org_id))
        held = self._held_by_another(org_id, subscribed)
        if held is not None:
            raise held
        customer = await self.get_customer(org_id)
        if customer is None:
            # (what the customer would be checked first, then the plan: a plan Lago lacks refused the subscription
            # once the customer was written, left behind with none)
            await self._check_setup(plan_code, org_name, email, _package_metadata(user_id, None), new=True)
            customer = await self.create_org_customer(org_id, org_name, email, user_id)
        else:
            current = customer_metadata(customer)
            missing = {key: value for key, value in _package_metadata(user_id, None).items() if key not in current}
            room = max(MAX_METADATA_ITEMS - len(current), 0)
            if len(missing) > room:  # the customer's own items fill Lago's 5: the org is subscribed all the same
                skipped = list(missing)[room:]
                missing = dict(list(missing.items())[:room])  # (billing_type first: is_org_customer reads it)
                logger.warning(
                    "The Lago customer of org %r has %d metadata items of its own (Lago keeps %d): %s not added. "
                    "Free metadata slots to have it marked (is_org_customer() and the migration's verify read "
                    "billing_type).",
                    org_id,
                    len(current),
                    MAX_METADATA_ITEMS,
                    ", ".join(skipped),
                )
            name = None if customer.get("name") else org_name
            mail = None if customer.get("email") else email
            if (name is not None or mail is not None or missing) and (subscribed or {}).get("plan_code") != plan_code:
                # (the completion checked, then the plan read, as for a new customer: a plan Lago lacks refused the
                # subscription once the customer was completed, a refused setup that wrote the name, email and org
                # marker all the same)
                await self._check_setup(plan_code, name, mail, {**current, **missing} if missing else None)
            customer = await self._update(customer, name, mail, missing, {})
        # (invalidated around its write: the customer alone changes nothing the gate decides on)
        subscription = await self._create_subscription(
            org_id, plan_code, billing_time, subscription_at, subscribed, subscription_fields
        )
        return {"customer": customer, "subscription": subscription}

    async def _check_setup(
        self,
        plan_code: str,
        name: str | None,
        email: str | None,
        metadata: Mapping[str, Any] | None,
        *,
        new: bool = False,
    ) -> None:
        """Raise before ``subscribe_org_to_plan`` writes the org's customer: :class:`InvalidRequestError` for the
        ``name``, ``email`` or ``metadata`` it would write (``None``: none written; a ``new`` customer's name is
        checked even then, it needs one) that Lago refuses, then Lago's ``plan_not_found`` (:meth:`_plan_known`)."""
        if name is not None or new:
            _name(name)
        if email is not None:
            _email(email)
        if metadata is not None:
            check_metadata(metadata)
        await self._plan_known(plan_code)

    async def _plan_known(self, plan_code: str) -> None:
        """Raise Lago's :class:`LagoNotFoundError` (``plan_not_found``) when it has no plan ``plan_code``. An API key
        that may not read plans (a 403) is no answer: the subscription's creation then says it, as before."""
        try:
            await self.client.get_plan(plan_code)
        except LagoAPIError as exc:
            if exc.status != 403:
                raise

    async def get_subscription(self, org_id: str, status: str | None = None) -> JSON | None:
        """The org's active subscription (or the one with ``status``), or ``None`` (also when another customer holds
        the org's subscription id: it is not the org's)."""
        try:
            subscription = await self.client.get_subscription(self.subscription_id(org_id), status=status)
        except LagoNotFoundError as exc:
            if no_such_route(exc):
                raise
            return None
        owner = subscription.get("external_customer_id")
        if owner is not None and owner != org_id:  # (a legacy user's named like the org: not the org's to show)
            logger.warning(
                "Subscription %r belongs to Lago customer %r, not org %r: the org has none of its own (see "
                "LAGO_SUBSCRIPTION_ID_TEMPLATE).",
                subscription.get("external_id"),
                owner,
                org_id,
            )
            return None
        return subscription

    async def change_plan(self, org_id: str, plan_code: str) -> JSON:
        """Upgrade or downgrade the org's active subscription to ``plan_code``.

        Lago decides by price: a plan at least as expensive takes effect now (a new subscription record); a
        cheaper one at the end of the period (the answer is the current subscription, with ``next_plan_code``
        and ``downgrade_plan_date``). A subscription that has not started yet (``subscription_at`` in the future)
        changes plan at once, still starting then. Raises :class:`LagoNotFoundError` when the org has neither, and
        :class:`InvalidRequestError` when the subscription under the org's id is another customer's.
        """
        changed = await self._change_plan(org_id, plan_code)
        assert changed is not None
        return changed

    async def _change_plan(self, org_id: str, plan_code: str, *, own_only: bool = False) -> JSON | None:
        """:meth:`change_plan`; ``own_only``: only when ``plan_code`` is the org's current plan (``billing_routes()``
        for a plan it does not offer: back to it cancels a downgrade the org's admin scheduled), else ``None`` and
        nothing written (no subscription, or another plan), decided on the one read the change is made from."""
        # (checked before any call: a plan code Lago cannot address was answered "no active subscription" for an org
        # without one, the argument at fault never named)
        plan_code = validate_id(plan_code, "plan_code")
        # (one that has not started yet too: Lago changes its plan in place)
        current = await self.client.get_current_subscription(self.subscription_id(org_id))
        if own_only and (current is None or current.get("plan_code") != plan_code):
            return None
        if current is None:
            waiting = await self._incomplete(self.subscription_id(org_id))
            if waiting is not None:
                raise _waiting_for_payment(waiting["external_id"], waiting, "to change its plan", "change it then")
            raise LagoNotFoundError(
                f"Org {org_id!r} has no active subscription to change: use create_subscription.",
                status=404,
                code="subscription_not_found",
            )
        self._check_owner(org_id, current, "its plan is not changed")
        async with self._changing(org_id):
            if plan_code == current.get("plan_code") and current.get("next_plan_code"):
                # Back to the current plan while a downgrade waits for the period end: Lago would answer the
                # subscription unchanged, the downgrade still scheduled. Cancel the pending downgrade instead.
                try:
                    await self.client.terminate_subscription(current["external_id"], status="pending")
                except LagoNotFoundError:
                    pass  # it started or was canceled meanwhile
                except LagoUnavailableError:
                    # The DELETE is not resent (its answer lost, Lago may have canceled the downgrade): read back what
                    # Lago did, as terminate_subscription does. Canceled, the change is made; still pending (or Lago
                    # unreadable), the error stands. (It raised while the plan was changed as asked.)
                    if await self._ended_behind_lost_answer(current["external_id"], "pending") is None:
                        raise
                changed = await self.client.get_subscription(current["external_id"])
            elif plan_code == current.get("plan_code"):  # already on it: Lago would replace one with plan_overrides
                changed = current
            else:
                changed = await self.client.create_subscription(
                    external_customer_id=current["external_customer_id"],
                    plan_code=plan_code,
                    external_id=current["external_id"],
                )
        return changed

    async def terminate_subscription(
        self,
        org_id: str,
        subscription_id: str | None = None,
        *,
        on_termination_invoice: str | None = None,
        on_termination_credit_note: str | None = None,
    ) -> JSON:
        """Terminate the org's active subscription, or cancel its pending one (``subscription_id`` defaults to the
        org's; another customer's is refused, under the org's own id too)."""
        # (both checked before any call, each named: the org's was not checked when a subscription_id was given, and
        # one Lago cannot address was said as the client's "subscription external_id")
        validate_id(org_id, "org_id")
        external_id = (
            validate_id(subscription_id, "subscription_id")
            if subscription_id is not None
            else self.subscription_id(org_id)
        )
        # the org's own id too: another customer may hold it (a legacy user's, named like the org)
        current = await self.client.get_current_subscription(external_id)  # (or one that has not started yet)
        if current is None:
            # (nothing left to end: maybe a run again after an answer lost, Lago had ended it; the gate told too)
            await self._invalidate(org_id)
            raise await self._nothing_to_terminate(external_id)
        self._check_owner(org_id, current, "not terminated")
        async with self._changing(org_id):
            for status in ("active", "pending"):  # not active: one that has not started yet is canceled
                try:
                    ended = await self.client.terminate_subscription(
                        external_id,
                        status=None if status == "active" else status,
                        on_termination_invoice=on_termination_invoice if status == "active" else None,
                        on_termination_credit_note=on_termination_credit_note if status == "active" else None,
                    )
                except LagoNotFoundError as exc:
                    if no_such_route(exc):
                        raise
                    continue
                except LagoUnavailableError:
                    # The DELETE is not retried (Lago may have applied it, its answer lost: a retry would 404). Read
                    # back what Lago did: ended, it is answered; still there (or Lago unreadable), the error stands.
                    lost = await self._ended_behind_lost_answer(external_id, status)
                    if lost is None:
                        raise
                    ended = lost
                return ended
            raise await self._nothing_to_terminate(external_id)

    async def _ended_behind_lost_answer(self, external_id: str, status: str) -> JSON | None:
        """After a terminate (``status`` active) or cancel (``pending``) whose answer was lost: the subscription Lago
        ended, or ``None`` when it is still ``status`` or cannot be read."""
        try:
            await self.client.get_subscription(external_id, status=None if status == "active" else status)
        except LagoNotFoundError as exc:
            if no_such_route(exc):
                return None
        except LagoIntegrationError:
            return None
        else:
            return None  # still there: Lago did not apply it
        try:
            ended = await self.client.get_subscription(
                external_id, status="terminated" if status == "active" else "canceled"
            )
        except LagoIntegrationError:
            return None
        logger.info("Subscription %s was ended by Lago although its answer was lost; answered as ended", external_id)
        return ended

    async def _incomplete(self, external_id: str) -> JSON | None:
        """The subscription ``external_id`` waiting for its payment (``incomplete``), if there is one."""
        try:
            return await self.client.get_subscription(external_id, status="incomplete")
        except LagoNotFoundError as exc:
            if no_such_route(exc):
                raise
            return None

    async def _nothing_to_terminate(self, external_id: str) -> LagoAPIError:
        """The error of a terminate that finds neither an active nor a pending subscription ``external_id``: it says
        when it is waiting for a payment (Lago refuses to end it: 422), when it already ended (a terminate run again,
        or one whose answer was lost), else that there is none."""
        for status in ("incomplete", "terminated", "canceled"):
            try:
                ended = await self.client.get_subscription(external_id, status=status)
            except LagoNotFoundError as exc:
                if no_such_route(exc):
                    return exc
                continue
            if status == "incomplete":  # (payment-gated: activation_rules of type payment)
                return _waiting_for_payment(external_id, ended, "to terminate it", "terminate it then")
            when = ended.get("terminated_at") or ended.get("canceled_at")
            return LagoNotFoundError(
                f"Subscription {external_id!r} is already {status} ({when}; lago_id {ended.get('lago_id')}): nothing "
                "left to terminate. Subscribe the org again (create_subscription) to bill it.",
                status=404,
                code="subscription_not_found",
            )
        return LagoNotFoundError(
            f"Subscription {external_id!r} is neither active nor pending, and never was: nothing to terminate. "
            "Check the org id (and LAGO_SUBSCRIPTION_ID_TEMPLATE), or subscribe the org first.",
            status=404,
            code="subscription_not_found",
        )

    # ------------------------------------------------------------------ usage

    async def record_usage(
        self,
        org_id: str,
        event_code: str,
        transaction_id: str | None = None,
        properties: Mapping[str, Any] | None = None,
        timestamp: dt.datetime | float | int | str | Decimal | None = None,
    ) -> JSON:
        """Send one usage event for the org now, with ``org_id`` added to its properties.

        Give a stable ``transaction_id`` to make retries safe (one is generated otherwise). Lago's ClickHouse store
        deduplicates on the id *and* the timestamp: without ``timestamp``, a retry here reuses the first call's
        (remembered a day in this process); across processes, pass the same ``timestamp``. An event Lago already has
        is not an error: the answer is the payload with ``"duplicate": True``. When Lago could not be reached (or its
        answer was lost) for an event whose id was generated here, the :class:`LagoUnavailableError` names that id and
        timestamp (its ``transaction_id`` and ``timestamp`` attributes too): Lago may hold the event, so resend it with
        them, not as a new event.

        Lago takes (200) an event of an org without a subscription yet, and bills it never, not even once the
        subscription exists (it ignores events before a subscription's ``started_at``): subscribe the org first
        (``subscribe_org_to_plan``, ``lago-org-billing migrate --execute``).
        """
        return await self._record_usage(org_id, event_code, transaction_id, properties, timestamp, quota=self.quota)

    async def _record_usage(
        self,
        org_id: str,
        event_code: str,
        transaction_id: str | None,
        properties: Mapping[str, Any] | None,
        timestamp: dt.datetime | float | int | str | Decimal | None,
        *,
        quota: QuotaGateProtocol | None,
    ) -> JSON:
        """:meth:`record_usage`, counting the event in ``quota`` (``billing_routes()``: the gate of the middleware the
        request went through)."""
        payload = self._usage_event(org_id, event_code, transaction_id, properties, timestamp)
        try:
            created = await self.client.create_event(payload)
        except LagoValidationError as exc:
            if exc.is_duplicate_only:
                other = await self._another_events_id(payload, exc)
                if other is not None:
                    raise other from None
                logger.info("Event %s was already in Lago; not recorded twice", payload["transaction_id"])
                return {**payload, "duplicate": True}
            raise
        except LagoUnavailableError as exc:
            if transaction_id is not None:  # (the caller's own id: its retry is deduplicated)
                raise
            # The id was made here: the caller cannot know it, and a retry without it is a second event, billed twice
            # if Lago took the first (its answer lost)
            transaction_id, stamp = payload["transaction_id"], payload["timestamp"]
            restated = exc._restated(
                LagoUnavailableError,
                f"{exc} Lago may hold the event all the same (an answer lost): resend it with "
                f"transaction_id={transaction_id!r} and timestamp={stamp!r}; a new id would be a second event, billed "
                "twice.",
            )
            restated.transaction_id, restated.timestamp = transaction_id, stamp  # type: ignore[attr-defined]
            raise restated from exc
        # (on ClickHouse a caller's retry is taken again, 200, and replaces the first: counted once, as queued ones are)
        if transaction_id is None or self._first_queued(payload):
            self._count(org_id, payload, quota, dated=timestamp is not None)
        return created

    async def _another_events_id(self, payload: JSON, exc: LagoValidationError) -> LagoAPIError | None:
        """Lago's Postgres store refused ``payload`` as a duplicate (its ``transaction_id`` and subscription): the
        error to raise when the event Lago holds under them is of another metric (a caller giving one id to a request's
        two events), not this one sent again; ``None`` for a resend, or when that cannot be read (said a duplicate, as
        before). One read, on this rare path."""
        try:
            held = await self.client.get_event(str(payload["transaction_id"]))
        except LagoIntegrationError:
            return None
        if held.get("external_subscription_id") != payload["external_subscription_id"]:
            return None  # (the first match across the account: another subscription's event, nothing known)
        if held.get("code") == payload["code"]:
            return None
        return exc._restated(
            LagoValidationError,
            f"Lago holds another event under transaction_id {payload['transaction_id']!r} for subscription "
            f"{payload['external_subscription_id']!r}: one of code {held.get('code')!r}, not {payload['code']!r}. "
            "Lago's Postgres store takes one event per transaction_id and subscription, whatever its code: give each "
            "event of a request its own transaction_id (e.g. '<request id>:<code>'). Nothing was recorded.",
        )

    def record_usage_nowait(
        self,
        org_id: str,
        event_code: str,
        transaction_id: str | None = None,
        properties: Mapping[str, Any] | None = None,
        timestamp: dt.datetime | float | int | str | Decimal | None = None,
    ) -> str:
        """Like :meth:`record_usage`, without waiting: the event goes to the background pipeline (batched,
        retried, spooled) and its ``transaction_id`` is returned. Needs ``OrgBilling(middleware=...)`` or
        ``OrgBilling(pipeline=...)``.

        An event the pipeline cannot take is not dropped silently: a closed pipeline raises
        :class:`ConfigurationError`, a full outbox (Lago slow or down for long) :class:`LagoUnavailableError`; send
        it with ``await record_usage(...)`` instead (nothing was queued)."""
        pipeline = self._require_pipeline()
        payload = self._usage_event(org_id, event_code, transaction_id, properties, timestamp)
        if not pipeline.submit(payload):  # (also logged and counted as dropped by the pipeline)
            raise _not_queued(pipeline, str(payload["transaction_id"]))
        if transaction_id is None or self._first_queued(payload):
            self._count(org_id, payload, self.quota, dated=timestamp is not None)
        return str(payload["transaction_id"])

    def _first_queued(self, event: JSON) -> bool:
        """Whether a caller-given event is recorded or queued for the first time here (within a day): a caller's retry
        of it (the same id, timestamp and code: a job run again, through either path) is one event in Lago, counted in
        the quota gate once. (Lago's ClickHouse store takes the retry, 200, and keeps one: record_usage counted it at
        each call, refusing the org below its limit until the gate's next read of Lago.)"""
        key = (event["external_subscription_id"], event["transaction_id"], str(event["timestamp"]), str(event["code"]))
        with self._queued_lock:
            if key in self._queued:
                return False
            self._queued[key] = True
        return True

    def _count(self, org_id: str, event: JSON, quota: QuotaGateProtocol | None, *, dated: bool) -> None:
        """Tell the quota gate (if any) about a recorded event: a call of ``LAGO_EVENT_CODE``, tokens of its token
        metric. ``dated``: the caller gave its timestamp (maybe of a period that has ended: see :func:`_dated`)."""
        if quota is None:
            return
        calls = event["code"] == self.settings.event_code
        tokens = 0
        if event["code"] == getattr(quota, "token_metric", self.settings.event_code):
            try:  # as Lago sums it: 500, 500.0, "500" and Decimal("500") (sent as "500") are 500 tokens
                tokens = _property_count("total_tokens", event["properties"].get("total_tokens")) or 0
            except InvalidRequestError:  # (not a count Lago can sum: it bills none)
                tokens = 0
        if calls or tokens:
            decision = _dated(quota, event, dated)
            # Called from a thread (record_*_nowait in a sync endpoint, run in a thread pool): the gate's records are
            # the event loop's (the in-process ones are plain dicts, added to by read-modify-writes that a thread
            # switch splits), so the loop's thread counts them, soon, as the pipeline is woken (see
            # EventPipeline._notify). Settled here, racing the loop and each other, records were lost from the
            # per-second buckets but not from the totals: a read of Lago that had them all dropped less than was
            # counted, and the difference stayed counted for the period, the org refused below its limit.
            pipeline = self.pipeline
            call_soon = getattr(pipeline, "_call_soon", None)
            if (
                call_soon is not None
                and getattr(pipeline, "_running", False)
                and getattr(pipeline, "_loop_thread", None) != threading.get_ident()
            ):
                try:
                    call_soon(functools.partial(_settle_logged, quota, org_id, decision, tokens, calls))
                    return
                except Exception:  # the loop has ended: counted here (below)
                    logger.debug("Could not count usage on the pipeline's loop from another thread", exc_info=True)
            with self._count_lock:  # (no loop running the pipeline: at least the threads do not race each other)
                quota.settle(org_id, decision, tokens=tokens, billed=calls)

    def record_api_call_nowait(
        self,
        org_id: str,
        transaction_id: str | None = None,
        endpoint: str | None = None,
        user_id: str | int | uuid.UUID | None = None,
        tokens: int = 0,
        model: str | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        timestamp: dt.datetime | float | int | str | Decimal | None = None,
        **properties: Any,
    ) -> str:
        """Like :meth:`record_api_call`, through the background pipeline; returns the ``transaction_id``."""
        props = _api_call_properties(endpoint, user_id, tokens, model, input_tokens, output_tokens, properties)
        return self.record_usage_nowait(org_id, self.settings.event_code, transaction_id, props, timestamp)

    def _require_pipeline(self) -> EventPipeline:
        pipeline = self.pipeline
        if pipeline is None:
            raise ConfigurationError(
                "record_*_nowait needs a delivery pipeline: OrgBilling(middleware=asgi_app) "
                "or OrgBilling(pipeline=EventPipeline(client))."
            )
        return pipeline

    def _usage_event(
        self,
        org_id: str,
        event_code: str,
        transaction_id: str | None,
        properties: Mapping[str, Any] | None,
        timestamp: dt.datetime | float | int | str | Decimal | None,
    ) -> JSON:
        if properties is not None and not isinstance(properties, Mapping):
            raise InvalidRequestError(
                f"properties must be a mapping of the event's properties, such as {{'tokens': 12}}, got "
                f"{type(properties).__name__}: nothing was sent."
            )
        event = event_payload(
            transaction_id=f"tx_{uuid.uuid4().hex}" if transaction_id is None else transaction_id,
            external_subscription_id=self.subscription_id(org_id),
            code=event_code,
            properties={**(properties or {}), "org_id": org_id},
            timestamp=timestamp,
        )
        if transaction_id and timestamp is None:  # a retry of a caller's event keeps its first timestamp
            sub = event["external_subscription_id"]
            event["timestamp"] = self.client._first_timestamp(sub, transaction_id, event["timestamp"])
        return event

    async def record_api_call(
        self,
        org_id: str,
        transaction_id: str | None = None,
        endpoint: str | None = None,
        user_id: str | int | uuid.UUID | None = None,
        tokens: int = 0,
        model: str | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        timestamp: dt.datetime | float | int | str | Decimal | None = None,
        **properties: Any,
    ) -> JSON:
        """Record one API call (event code ``LAGO_EVENT_CODE``) with user, endpoint, model and tokens, at
        ``timestamp`` (now when omitted; see :meth:`record_usage`). ``endpoint`` and ``model`` are text; ``user_id``
        is text, or an integer or a UUID written as its text (as the middleware's events carry them)."""
        props = _api_call_properties(endpoint, user_id, tokens, model, input_tokens, output_tokens, properties)
        return await self.record_usage(org_id, self.settings.event_code, transaction_id, props, timestamp)

    async def get_current_usage(self, org_id: str, billable_metric_code: str | None = None) -> JSON | None:
        """Usage of the org's current billing period (``customer_usage``), or ``None`` when the org has no
        active subscription."""
        try:
            return await self.client.get_current_usage(
                validate_id(org_id, "org_id"),
                self.subscription_id(org_id),
                billable_metric_code=billable_metric_code,
            )
        except LagoNotFoundError as exc:
            if exc.code in ("customer_not_found", "subscription_not_found"):
                return None
            if exc.code == "charge_not_found" and billable_metric_code is not None:
                # (Lago's 404 of the filter, not of the org: "check the id, or create the resource first" named none)
                raise exc._restated(
                    LagoNotFoundError,
                    f"The plan of org {org_id!r} has no charge on billable metric {billable_metric_code!r} "
                    "(billable_metric_code, Lago's charge_not_found): check the metric's code (case-sensitive), or "
                    "add a charge on it to the plan; without billable_metric_code, the usage of every charge.",
                ) from None
            raise
        except LagoAPIError as exc:
            if exc.status == 405 and exc.code == "no_active_subscription":
                return None
            raise

    # ---------------------------------------------------------------- invoices

    async def get_invoices(self, org_id: str, limit: int = 10) -> list[JSON]:
        """The org's most recent invoices, at most ``limit``."""
        given: object = limit  # (numpy's int64...: taken, as an int, which the client's per_page is)
        if isinstance(given, bool) or not isinstance(given, numbers.Integral) or given < 1:
            raise InvalidRequestError(f"limit must be a whole number >= 1, got {limit!r}.")
        limit = int(given)
        invoices: list[JSON] = []
        async for invoice in self.client.iter_invoices(
            external_customer_id=validate_id(org_id, "org_id"), per_page=min(limit, 100)
        ):
            invoices.append(invoice)
            if len(invoices) >= limit:
                break
        return invoices

    # --------------------------------------------------------------- migration

    async def migrate_user_to_org(
        self,
        user_id: str,
        org_id: str,
        org_name: str,
        email: str | None = None,
        *,
        plan_code: str | None = None,
        on_termination_invoice: str = "generate",
        on_termination_credit_note: str | None = None,
        allow_unreadable_entitlements: bool = False,
        prepare_only: bool = False,
        accept_unmoved: Collection[str] = (),
    ) -> JSON:
        """Move one user-keyed Lago customer's billing to its org (the ``migrate`` CLI's code path).

        Lago cannot rename a customer nor move a subscription, so: the org customer is upserted (with
        ``migrated_from_user``), the org is subscribed to the user's plan (or ``plan_code``) *before* the user's
        active subscriptions are terminated, and the user customer is marked (``migrated_to_org``). Safe to
        re-run. An org that already has a subscription keeps it (``plan_code`` is then ignored, with a warning).
        Returns what was done: ``changed``, ``steps``, ``warnings``, the org ``customer`` and ``subscription``.
        When the API key may not read entitlements (``GET /features`` answers 403), raises
        ``EntitlementsUnreadableError`` unless ``allow_unreadable_entitlements`` (the user's entitlement overrides
        are then not carried, and ``warnings`` says so). ``prepare_only=True`` makes the first phase of a migration
        while traffic flows (``migrate --execute --prepare``): the org customer and subscription only, the user's
        subscriptions left active and unmarked; the same call without it, once the middleware is deployed, ends and
        marks them. ``phase`` in the answer: ``prepare``, ``finish`` (the org subscribed before) or ``both``.
        A user whose customer holds wallets, coupons, a payment provider link or integrations the org customer lacks
        is refused (``UnmovedHoldingsError``, before any write, saying what to move) unless ``accept_unmoved`` names
        those kinds (``"all"``: every one); nothing is moved for them.
        """
        from ._migration import migrate_user

        # (subscribed through the client: the org may have been refused until now; a failure midway may have too)
        async with self._changing(org_id):
            outcome = await migrate_user(
                self,
                user_id=user_id,
                org_id=org_id,
                org_name=org_name,
                email=email,
                plan_code=plan_code,
                on_termination_invoice=on_termination_invoice,
                on_termination_credit_note=on_termination_credit_note,
                allow_unreadable_entitlements=allow_unreadable_entitlements,
                prepare_only=prepare_only,
                accept_unmoved=accept_unmoved,
            )
        return outcome

    # ------------------------------------------------------------------ health

    async def check_lago_health(self, *, retry: bool = False) -> JSON:
        """Whether Lago answers, without raising: ``{"healthy", "url", "version", "latency_ms", "error",
        "warnings"}``.

        A probe (a readiness check): one attempt per call, each within ``LAGO_API_TIMEOUT``, so it reports Lago as it
        is now rather than after retrying an unhealthy one; ``retry=True`` retries as other calls do. ``warnings``
        lists what a healthy Lago will not bill as configured (``LAGO_EVENT_CODE`` naming no billable metric), and a
        permission the API key lacks (a key Lago takes, scoped by resource without reading customers: healthy)."""
        started = time.perf_counter()
        result: JSON = {
            "healthy": False,
            "url": masked_url(self.settings.api_url),
            "version": None,
            "error": None,
            "warnings": [],
        }
        try:
            body = await self.client.health(retry=retry)
        except (LagoIntegrationError, RuntimeError) as exc:  # (RuntimeError: a closed client)
            result["error"] = str(exc)
        else:
            result["healthy"] = body.get("message", "Success") == "Success"
            result["version"] = body.get("version")
            if not result["healthy"]:
                result["error"] = str(body.get("details") or body.get("message"))
        if result["healthy"]:  # Lago's /health needs no key: one authenticated call checks the key too
            try:
                await self.client.list_customers(per_page=1, retry=retry)
            except LagoAuthenticationError as exc:
                if exc.status == 403 and "_action_not_allowed_for_" in (exc.code or ""):
                    # Lago knows the key (401 is an unknown one): it is scoped by resource (Lago's API key
                    # permissions) without reading customers, as a key for the middleware's events and quota reads can
                    # be. Said unhealthy, "refuses this API key", a readiness probe of a working deployment failed.
                    result["warnings"].append(
                        f"Lago takes this API key, but {exc.code} (its permissions in Lago's API key settings): "
                        "OrgBilling's customer calls (get_customer, create_org_customer, subscribe_org_to_plan...) "
                        "are refused with it. Grant it the permission if this app makes them."
                    )
                else:
                    result["healthy"] = False
                    result["error"] = f"Lago is up, but refuses this API key: {exc}"
            except LagoIntegrationError as exc:
                result["healthy"] = False
                result["error"] = f"Lago is up, but an API call failed: {exc}"
        if result["healthy"]:
            # Lago takes events of a code no billable metric has (200) and bills none of them (lago-api.md: "unknown
            # code is NOT rejected"): a mistyped LAGO_EVENT_CODE, or a metric not made yet, lost every request's
            # billing without a word anywhere. Only Lago's own answer that there is no such metric is said (a key
            # whose permissions do not cover billable metrics, or a failed read, tells nothing about it).
            code = self.settings.event_code
            try:
                await self.client.get_billable_metric(code, retry=retry)
            except LagoNotFoundError as exc:
                if exc.code == "billable_metric_not_found":
                    result["warnings"].append(
                        f"LAGO_EVENT_CODE {code!r} is the code of no billable metric in this Lago: Lago takes the "
                        "events sent under it and bills none of them. Create the billable metric with that code "
                        "(Lago: Billable metrics), or set LAGO_EVENT_CODE to the code of the one that bills requests."
                    )
            except (LagoIntegrationError, RuntimeError):
                pass
        result["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
        return result


def _not_queued(pipeline: EventPipeline, transaction_id: str) -> LagoIntegrationError:
    """Why ``pipeline`` refused the event ``transaction_id``, as the error :meth:`OrgBilling.record_usage_nowait`
    raises."""
    if getattr(pipeline, "closed", False):
        return ConfigurationError(
            f"Event {transaction_id!r} was not queued: OrgBilling's delivery pipeline is closed (the app shut down, or "
            "was served again and its middleware made a new pipeline). Build OrgBilling(middleware=asgi_app) to follow "
            "the middleware's current pipeline, or send the event now with await billing.record_usage(...)."
        )
    outbox = getattr(pipeline, "outbox", None)
    capacity = getattr(outbox, "capacity", None)
    if getattr(outbox, "durable", False):  # (a spool: full of events waiting for its next commit, not for Lago)
        return LagoUnavailableError(
            f"Event {transaction_id!r} was not queued: {capacity} events are waiting for the spool's next commit (its "
            "writes failing or stalled: see the errors logged about the spool). Send it later with await "
            "billing.record_usage(...) (same transaction_id), and raise EventPipeline(memory_capacity=...) if bursts "
            "fill it."
        )
    return LagoUnavailableError(
        f"Event {transaction_id!r} was not queued: the delivery outbox is full ({capacity} events wait for Lago, "
        "which is slow or down). Send it later with await billing.record_usage(...) (same transaction_id), and set "
        "LAGO_SPOOL_PATH for a durable spool or raise EventPipeline(memory_capacity=...)."
    )


def _check_billing_arguments(
    settings: object, client: object, pipeline: object, quota: object, middleware: object
) -> None:
    """Refuse an argument of ``OrgBilling(...)`` that cannot work, where it was written (each failed later: at the
    first call, or at the first ``record_*_nowait``)."""
    if settings is not None and not isinstance(settings, BillingSettings) and not checks.double(settings):
        raise ConfigurationError(
            "OrgBilling(settings) must be a BillingSettings (BillingSettings.from_env()), got "
            f"{type(settings).__name__}."
        )
    if client is not None:
        checks.client("OrgBilling(client=...)", client)
    if pipeline is not None:
        checks.built("OrgBilling(pipeline=...)", pipeline, what="an EventPipeline (e.g. middleware.pipeline)")
    if quota is not None:
        checks.built("OrgBilling(quota=...)", quota, what="a quota gate (e.g. middleware.quota)")
    if pipeline is not None and not callable(getattr(pipeline, "submit", None)):
        raise ConfigurationError(
            "OrgBilling(pipeline=...) must be an EventPipeline (e.g. middleware.pipeline), got "
            f"{type(pipeline).__name__}."
        )
    if quota is not None and not callable(getattr(quota, "settle", None)):
        raise ConfigurationError(
            f"OrgBilling(quota=...) must be a quota gate (e.g. middleware.quota), got {type(quota).__name__}."
        )
    if (
        middleware is not None
        and not isinstance(getattr(middleware, "settings", None), BillingSettings)
        and not checks.double(middleware)
    ):
        raise ConfigurationError(
            "OrgBilling(middleware=...) must be the OrgBillingMiddleware instance served (asgi_app = "
            f"OrgBillingMiddleware(app)), got {type(middleware).__name__}."
        )


def check_metadata(metadata: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidRequestError` unless ``metadata`` fits Lago's customer metadata limits
    (at most 5 items, keys of at most 20 characters, string values of at most 100)."""
    problems: list[str] = []
    if len(metadata) > MAX_METADATA_ITEMS:
        problems.append(
            f"{len(metadata)} items ({', '.join(map(repr, metadata))}) but Lago keeps at most {MAX_METADATA_ITEMS}"
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not key.strip():
            problems.append(f"key {key!r} must be a non-empty string")
        elif len(key) > MAX_METADATA_KEY:
            problems.append(f"key {key!r} is {len(key)} characters, Lago allows {MAX_METADATA_KEY}")
        elif _unstorable(key):
            problems.append(f"key {key!r} {_unstorable(key)}")
        if not isinstance(value, str) or not value.strip():  # (Lago: presence, so blanks are refused)
            problems.append(f"value of {key!r} must be a non-blank string, got {value!r}")
        elif len(value) > MAX_METADATA_VALUE:
            problems.append(f"value of {key!r} is {len(value)} characters, Lago allows {MAX_METADATA_VALUE}")
        elif _unstorable(value):
            problems.append(f"value of {key!r} {_unstorable(value)}")
    if problems:
        raise InvalidRequestError("Customer metadata does not fit Lago's limits: " + "; ".join(problems) + ".")


def _api_call_properties(
    endpoint: str | None,
    user_id: str | int | uuid.UUID | None,
    tokens: int,
    model: str | None,
    input_tokens: int | None,
    output_tokens: int | None,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    for name, count in (("tokens", tokens), ("input_tokens", input_tokens), ("output_tokens", output_tokens)):
        if count is not None and (
            isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= _MAX_COUNT
        ):
            raise InvalidRequestError(f"{name} must be a whole number from 0 to 2**53 - 1, got {count!r}.")
    props: dict[str, Any] = dict(extra)
    if not tokens and input_tokens is None and output_tokens is None:  # no count given: those of the properties
        # (under the arguments' rule: whole numbers, 500.0 or "500" too, the parts when the total is 0 or null)
        counts = {name: _property_count(name, props.get(name)) for name in ("total_tokens", *_PARTS)}
        props.update({name: count for name, count in counts.items() if count is not None})
        tokens, input_tokens, output_tokens = (
            counts["total_tokens"] or 0,
            counts["input_tokens"],
            counts["output_tokens"],
        )
    props["total_tokens"] = tokens or (input_tokens or 0) + (output_tokens or 0)
    for key, value in (
        ("user_id", _attribution_text("user_id", user_id, ids=True)),
        ("endpoint", _attribution_text("endpoint", endpoint)),
        ("model", _attribution_text("model", model)),
        ("input_tokens", input_tokens),
        ("output_tokens", output_tokens),
    ):
        if value is not None:
            props[key] = value
    return props


def _settle_logged(quota: QuotaGateProtocol, org_id: str, decision: QuotaDecision, tokens: int, billed: bool) -> None:
    """``quota.settle(...)`` run by the event loop for another thread (see ``OrgBilling._count``): an error is logged,
    not raised into the loop (trio's ends its run on a callback's error)."""
    try:
        quota.settle(org_id, decision, tokens=tokens, billed=billed)
    except Exception:
        logger.exception("Could not count usage of org %.200r in the quota gate", org_id)


def _dated(quota: QuotaGateProtocol, event: JSON, dated: bool) -> QuotaDecision:
    """The decision a recorded event is counted with: in this package's gate, with an event the caller dated, its
    second (Lago bills it in the period of its timestamp: one of a period that has ended is not counted in the current
    one); else none (counted now)."""
    if dated and isinstance(quota, QuotaGate):
        return _Decision(reserved=False, bucket=int(float(event["timestamp"])))
    return QuotaDecision()


def _attribution_text(name: str, value: object, ids: bool = False) -> str | None:
    """``value`` as the text the middleware's events carry for ``name`` (Lago's filters and groupings match text);
    with ``ids``, an integer or a UUID (user ids often are) as its text. Anything else raises."""
    if value is None or isinstance(value, str):
        return value
    if ids and not isinstance(value, bool):  # (True is an int: not an id)
        if isinstance(value, numbers.Integral):  # (numpy's int64 too)
            return str(int(value))
        if isinstance(value, uuid.UUID):
            return str(value)
    taken = "text, an integer or a UUID" if ids else "text"
    raise InvalidRequestError(f"{name} must be {taken} (or None), got {type(value).__name__}: {value!r:.80}.")


#: The largest token count an event carries: every JSON reader keeps it exact (a double's integers).
_MAX_COUNT = 2**53 - 1
_PARTS = ("input_tokens", "output_tokens")


def _property_count(name: str, value: Any) -> int | None:
    """A token count given as a property (``None`` when absent or null): a whole number from 0 to 2**53 - 1, as
    ``500``, ``500.0`` or ``"500"``; anything else raises :class:`InvalidRequestError`."""
    if value is None:
        return None
    count: Decimal | None = None
    if not isinstance(value, bool) and isinstance(value, (int, float, str, Decimal)):
        try:
            count = Decimal(value.strip() if isinstance(value, str) else value)
        except (InvalidOperation, ValueError):
            count = None
    if count is None or not count.is_finite() or count != count.to_integral_value() or not 0 <= count <= _MAX_COUNT:
        raise InvalidRequestError(
            f"properties.{name} (a token count) must be a whole number from 0 to 2**53 - 1, got {value!r}."
        )
    return int(count)


def _waiting_for_payment(external_id: str, subscription: JSON, refused: str, then: str) -> LagoValidationError:
    """The error of a write Lago refuses while the subscription ``external_id`` is ``incomplete`` (payment-gated:
    ``activation_rules`` of type payment): Lago's 422 ``subscription_incomplete`` names no field to fix."""
    lago_id = f" (lago_id {subscription['lago_id']})" if subscription.get("lago_id") else ""
    return LagoValidationError(
        f"Subscription {external_id!r} is incomplete{lago_id}: waiting for the payment that activates it, and Lago "
        f"refuses {refused} meanwhile (subscription_incomplete). It is canceled if the payment fails or times out; "
        f"once paid it is active: {then}.",
        status=422,
        code="validation_errors",
        details={"base": ["subscription_incomplete"]},
    )


def _unaddressable(external_id: str) -> bool:
    """An id that no org customer can have: one with a character Lago cannot take in a URL path ('.', '/'...)."""
    try:
        validate_id(external_id)
    except InvalidIdentifierError:
        return external_id == external_id.strip() and _FORBIDDEN.search(external_id) is not None
    return False


def _package_metadata(user_id: str | int | uuid.UUID | None, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    wanted = _metadata_mapping(metadata)
    wanted[METADATA_BILLING_TYPE] = ORGANIZATION
    if user_id is not None:  # a metadata value, never in a URL path: emails and dotted ids too (check_metadata)
        # (an integer or a UUID as its text, as record_api_call and the middleware's events carry the user: refused,
        # it was said "value of 'created_by_user_id' must be a non-blank string", a key the caller never wrote)
        wanted[METADATA_CREATED_BY] = _attribution_text("user_id", user_id, ids=True)
    return wanted


def _metadata_mapping(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``metadata`` argument of ``create_org_customer``/``update_org_customer`` as a dict; anything but a mapping
    raises :class:`InvalidRequestError`. ``dict()`` of Lago's own item list (``[{"key": "tier", "value": "gold"}]``,
    the shape Lago answers) reads each item as a pair: every item became the one item ``{"key": "value"}``, the org's
    metadata lost without an error; of a string, a ValueError."""
    given: object = metadata  # (the annotation says Mapping: what callers pass is checked)
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        items = (
            " (Lago's item list: pass {item['key']: item['value'] for item in items})"
            if isinstance(given, (list, tuple))
            else ""
        )
        raise InvalidRequestError(
            f"metadata must be a mapping of {{key: value}}, such as {{'tier': 'gold'}}, got "
            f"{type(given).__name__}{items}: nothing was sent."
        )
    return dict(given)


def customer_metadata(customer: Mapping[str, Any] | None) -> dict[str, str]:
    """A Lago customer's metadata items as ``{key: value}`` (also when a drifting Lago writes them as an object, or
    with entries that are not items: those are skipped)."""
    if customer is None:
        return {}
    metadata = customer.get("metadata")
    if isinstance(metadata, Mapping):
        return {str(key): str(value) for key, value in metadata.items() if value is not None}
    # (an item without a value holds nothing: left out, not read as the text "None" and written back so)
    return {str(item["key"]): str(item["value"]) for item in _metadata_items(metadata) if item.get("value") is not None}


def _metadata_items(metadata: object) -> list[Mapping[str, Any]]:
    """The items of a customer's ``metadata`` list that are items (objects with a ``key``)."""
    if not isinstance(metadata, list):
        return []
    return [item for item in metadata if isinstance(item, Mapping) and "key" in item]


def metadata_update_items(customer: Mapping[str, Any] | None, metadata: Mapping[str, str]) -> list[JSON]:
    """The ``metadata`` list that makes a customer's metadata exactly ``metadata``.

    Lago deletes every existing item whose ``id`` is missing from an update, and a key re-sent without its id
    collides with itself: items that stay keep their ``id`` and ``display_in_invoice``; new keys are added."""
    existing = {str(item["key"]): item for item in _metadata_items((customer or {}).get("metadata"))}
    items: list[JSON] = []
    for key, value in metadata.items():
        entry: JSON = {"key": key, "value": value}
        known = existing.get(key)
        if known is not None and known.get("lago_id"):
            entry["id"] = known["lago_id"]
        entry["display_in_invoice"] = bool(known.get("display_in_invoice")) if known is not None else False
        items.append(entry)
    return items


def _name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequestError(f"org_name must be a non-empty string, got {name!r}.")
    if len(name) > 255:
        raise InvalidRequestError("org_name is longer than Lago's 255 characters.")
    if _unstorable(name):
        raise InvalidRequestError(f"org_name {name!r} {_unstorable(name)}.")
    return name


def _unstorable(text: str) -> str | None:
    """Why Lago cannot store ``text`` (a NUL: Postgres text has none, Lago answers 500, retried as an outage; a lone
    surrogate: no UTF-8, the JSON body cannot be encoded), else ``None``."""
    if "\x00" in text:
        return "contains a NUL character, which Lago's database cannot store"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone surrogate (e.g. '\\ud800' from a client's JSON): it is not valid Unicode text"
    return None


def _email(email: str) -> str:
    if not isinstance(email, str) or "@" not in email or email != email.strip() or _unstorable(email):
        raise InvalidRequestError(f"email {email!r} is not an email address.")
    return email


def _iso(
    value: dt.datetime | dt.date | str | None, what: str = "subscription_at", zone: dt.tzinfo = dt.timezone.utc
) -> str | None:
    """A subscription date as Lago takes it: an aware datetime, a date (or an ISO 8601 ``YYYY-MM-DD`` string) at its
    00:00 in ``zone`` (the customer's: Lago counts billing days in it, so 00:00 UTC would start a Tokyo subscription
    at 09:00 there and a New York one on the evening before, a day of the previous period billed). Sent in its own
    offset: Lago checks ``ending_at`` against today and ``subscription_at`` on the dates as written, so a Paris
    ``ending_at`` of tomorrow written in UTC (today, 23:00) is refused as ``invalid_date``."""
    day = _day(value)
    if day is not None:
        value = dt.datetime.combine(day, dt.time(), tzinfo=zone)  # (a DST day without 00:00: its first instant)
    elif value is None or isinstance(value, str):
        return value
    elif not isinstance(value, dt.datetime):
        raise InvalidRequestError(
            f"{what} must be a timezone-aware datetime, a date or an ISO 8601 string, got {value!r}."
        )
    offset = value.utcoffset()
    if offset is None:
        raise InvalidRequestError(f"{what} must be a timezone-aware datetime.")
    if not offset or offset % dt.timedelta(minutes=1):  # (UTC, or an offset ISO 8601 cannot write: in UTC)
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return value.replace(microsecond=0).isoformat()


def _day(value: object) -> dt.date | None:
    """``value`` as a day: a date, or an ISO 8601 date string (``2026-03-01``); else ``None``."""
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value
    if isinstance(value, str) and _ISO_DAY.fullmatch(value):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:  # (2026-02-30: Lago's to refuse, as given)
            return None
    return None


_ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _is_day(value: object) -> bool:
    return _day(value) is not None


def _check_subscription_arguments(subscription_at: Any, fields: Mapping[str, Any], billing_time: Any) -> None:
    """Raise :class:`InvalidRequestError` for a subscription date Lago cannot be sent (a naive datetime...), a
    ``billing_time`` it does not take, or a field the org's subscription gets from its org (given, it raised a bare
    ``TypeError``, its customer written already)."""
    _iso(subscription_at, "subscription_at")
    _iso(fields.get("ending_at"), "ending_at")
    check_billing_time(billing_time)
    reserved = sorted(key for key in ("external_customer_id", "external_id", "plan_code") if key in fields)
    if reserved:
        raise InvalidRequestError(
            f"{', '.join(reserved)} cannot be given: the org's subscription is its customer's (the org id), under the "
            "external_id LAGO_SUBSCRIPTION_ID_TEMPLATE makes of the org id (BillingSettings.subscription_id_template "
            "changes it), on the plan_code argument."
        )


def _customer_zone(customer: Mapping[str, Any] | None) -> dt.tzinfo:
    """The time zone Lago bills ``customer`` in (``applicable_timezone``); UTC without a customer (Lago then creates
    it in the organization's, UTC unless set otherwise) or when this machine's zone database lacks the name."""
    name = (customer or {}).get("applicable_timezone") or (customer or {}).get("timezone")
    if not name or name in ("UTC", "Etc/UTC"):
        return dt.timezone.utc
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        logger.warning(
            "Time zone %r of Lago customer %r is unknown here (install tzdata): its subscription date is read in UTC.",
            name,
            (customer or {}).get("external_id"),
        )
        return dt.timezone.utc
