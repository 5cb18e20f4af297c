"""The migration test data set: 2,000 user customers in 500 orgs, seeded straight into a FakeLago.

Org ``k`` (``o000``..``o499``) has users ``u{4k}``..``u{4k+3}``; each user's own subscription is ``sub_<user>``.
By ``k % 10``:

* 0: already migrated (org customer + org subscription on ``starter``, user subscriptions terminated, users
  marked ``migrated_to_org``);
* 1: half migrated (org customer and org subscription on ``pro`` exist, users still subscribed);
* 2: no user has a subscription (needs ``--default-plan``);
* 3: user 3 has only a pending subscription starting next month (must be canceled);
* 4: user 0 has a pending downgrade from ``pro`` to ``starter``;
* others: mixed plans, user 1 without a subscription, user 2 on anniversary billing.

Plans: ``free`` (0), ``starter`` (10 USD/month), ``pro`` (50 USD/month), ``team_yearly`` (400 USD/year,
cheaper per year than ``pro`` although its amount is larger: the ``highest`` policy must pick ``pro``).
"""

from __future__ import annotations

import csv
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from lago_org_billing.testing import FakeLago

API_KEY = "migration-key"
ORGS = 500
USERS_PER_ORG = 4
MIXED = ("starter", "pro", "team_yearly")
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)


def new_fake() -> FakeLago:
    """A FakeLago on a frozen clock, so the dataset's billing periods are the same on every run."""
    return FakeLago(api_key=API_KEY, clock=lambda: NOW)


def org_id(k: int) -> str:
    return f"o{k:03d}"


def user_id(k: int, j: int) -> str:
    return f"u{k * USERS_PER_ORG + j:04d}"


def rows(orgs: int = ORGS) -> list[dict[str, Any]]:
    """The mapping rows (``user_id, org_id, org_name, email``)."""
    return [
        {
            "user_id": user_id(k, j),
            "org_id": org_id(k),
            "org_name": f"Org {k}",
            "email": f"{user_id(k, j)}@example.test",
        }
        for k in range(orgs)
        for j in range(USERS_PER_ORG)
    ]


def write_mapping(path: Path, orgs: int = ORGS) -> Path:
    """Write the mapping as CSV (``.csv``) or JSON (any other suffix)."""
    data = rows(orgs)
    if path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=["user_id", "org_id", "org_name", "email"])
            writer.writeheader()
            writer.writerows(data)
    else:
        path.write_text(json.dumps(data), encoding="utf-8")
    return path


def seed(fake: FakeLago, orgs: int = ORGS) -> FakeLago:
    """Load the data set into ``fake`` with the Python seeding API (fast, no HTTP)."""
    fake.add_plan("free", amount_cents=0)
    fake.add_plan("starter", amount_cents=1_000)
    fake.add_plan("pro", amount_cents=5_000)
    fake.add_plan("team_yearly", amount_cents=40_000, interval="yearly")
    later = (fake.now() + timedelta(days=31)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for k in range(orgs):
        kind = k % 10
        users = [user_id(k, j) for j in range(USERS_PER_ORG)]
        for user in users:
            fake.add_customer(user, name=f"User {user}", email=f"{user}@example.test")
        if kind == 0:
            metadata = {"billing_type": "organization", "migrated_from_user": ",".join(users)}
            metadata["created_by_user_id"] = users[0]
            items = [{"key": key, "value": value} for key, value in metadata.items()]
            fake.add_customer(org_id(k), name=f"Org {k}", email=f"billing@o{k}.test", metadata=items)
            fake.add_subscription(org_id(k), "starter", external_id=org_id(k))
            for user in users:
                fake.add_subscription(user, "starter", external_id=f"sub_{user}")
                fake.store.terminate_subscription(f"sub_{user}", {"on_termination_invoice": "skip"})
                fake.add_customer(user, metadata=[{"key": "migrated_to_org", "value": org_id(k)}])
            continue
        if kind == 1:
            fake.add_customer(org_id(k), name=f"Org {k}", email=f"billing@o{k}.test")
            fake.add_subscription(org_id(k), "pro", external_id=org_id(k))
        if kind == 2:
            continue
        for j, user in enumerate(users):
            if j == 1:
                continue  # a user without a subscription
            if kind == 3 and j == 3:
                fake.add_subscription(user, "pro", external_id=f"sub_{user}", subscription_at=later)
                continue
            plan = MIXED[(k + j) % 3]
            billing_time = "anniversary" if j == 2 else "calendar"
            fake.add_subscription(user, plan, external_id=f"sub_{user}", billing_time=billing_time)
            if kind == 4 and j == 0:
                if plan == "starter":
                    continue
                fake.add_subscription(user, "starter", external_id=f"sub_{user}")  # a pending downgrade
    return fake


def expected_plan(k: int) -> str:
    """The plan the ``highest`` policy gives org ``k`` (with ``--default-plan free``)."""
    kind = k % 10
    if kind == 0:
        return "starter"
    if kind == 1:
        return "pro"
    if kind == 2:
        return "free"
    plans = {MIXED[(k + j) % 3] for j in (0, 2, 3) if not (kind == 3 and j == 3)}
    yearly = {"starter": 12_000, "pro": 60_000, "team_yearly": 40_000}
    return max(plans, key=yearly.__getitem__)
