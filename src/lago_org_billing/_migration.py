"""Moving user-keyed Lago customers to org-keyed ones.

Lago can neither rename a customer's ``external_id`` nor move a subscription to another customer, so one
user's migration is: upsert the org customer, subscribe the org (before anything is terminated, so the org is
never without a plan), terminate the user's active subscriptions, and mark the user customer. Every step is
idempotent, so a re-run changes nothing already done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._billing import METADATA_MIGRATED_FROM
from ._client import JSON

if TYPE_CHECKING:
    from ._billing import OrgBilling

__all__ = ["METADATA_MIGRATED_TO", "migrate_user"]

#: Set on the user customer once its billing has moved to the org.
METADATA_MIGRATED_TO = "migrated_to_org"


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
) -> JSON:
    """Migrate one user to its org; returns what was done (``changed`` is False on a no-op re-run)."""
    client = billing.client
    changed = False
    user_customer = await billing.get_customer(user_id)
    user_subscriptions: list[JSON] = []
    if user_customer is not None:
        user_subscriptions = [s async for s in client.iter_subscriptions(external_customer_id=user_id)]
    if plan_code is None and user_subscriptions:
        plan_code = max(user_subscriptions, key=_plan_amount)["plan_code"]

    org_customer = await billing.get_customer(org_id)
    if org_customer is None or _metadata(org_customer).get(METADATA_MIGRATED_FROM) is None:
        org_customer = await billing.create_org_customer(
            org_id, org_name, email, user_id=user_id, metadata={METADATA_MIGRATED_FROM: user_id}
        )
        changed = True

    subscription = await billing.get_subscription(org_id)
    if plan_code is not None and (subscription is None or subscription.get("plan_code") != plan_code):
        if subscription is None:
            subscription = await billing.create_subscription(org_id, plan_code)
        else:
            subscription = await billing.change_plan(org_id, plan_code)
        changed = True

    terminated: list[str] = []
    for user_subscription in user_subscriptions:
        await client.terminate_subscription(
            user_subscription["external_id"],
            on_termination_invoice=on_termination_invoice,
            on_termination_credit_note=on_termination_credit_note,
        )
        terminated.append(user_subscription["external_id"])
        changed = True

    if user_customer is not None and _metadata(user_customer).get(METADATA_MIGRATED_TO) != org_id:
        await billing.client.update_customer(user_id, metadata=_with_item(user_customer, METADATA_MIGRATED_TO, org_id))
        changed = True

    return {
        "user_id": user_id,
        "org_id": org_id,
        "plan_code": plan_code,
        "customer": org_customer,
        "subscription": subscription,
        "terminated_subscriptions": terminated,
        "changed": changed,
    }


def _plan_amount(subscription: JSON) -> int:
    amount = subscription.get("plan_amount_cents")
    if amount is None:
        amount = (subscription.get("plan") or {}).get("amount_cents")
    return int(amount or 0)


def _metadata(customer: JSON) -> dict[str, Any]:
    return {item["key"]: item["value"] for item in customer.get("metadata") or [] if "key" in item}


def _with_item(customer: JSON, key: str, value: str) -> list[JSON]:
    from ._billing import check_metadata

    items = [
        {
            "id": item["lago_id"],
            "key": item["key"],
            "value": item["value"],
            "display_in_invoice": item.get("display_in_invoice", False),
        }
        for item in customer.get("metadata") or []
        if item.get("key") != key
    ]
    check_metadata({**{item["key"]: item["value"] for item in items}, key: value})
    items.append({"key": key, "value": value, "display_in_invoice": False})
    return items
