"""``lago-org-billing migrate`` as an operator runs it: what a user's subscription carries besides its plan
code (a price of its own, a fixed end date) must not be lost when its billing moves to the org (emulator)."""

from __future__ import annotations

import copy
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from lago_org_billing import BillingSettings
from lago_org_billing._migration_cli import run_migrate_command
from lago_org_billing.testing import FakeLago
from test_migration_cli import parse

API_KEY = "k"
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def fake() -> FakeLago:
    fake = FakeLago(api_key=API_KEY, clock=lambda: NOW)
    fake.add_plan("enterprise", amount_cents=0)
    fake.add_plan("pro", amount_cents=5_000)
    return fake


def price_override(fake: FakeLago, external_id: str, **plan_fields: Any) -> None:
    """What Lago does for ``POST /subscriptions {"plan_overrides": {...}}``: the subscription gets a child plan of
    its plan (same code, its own ``lago_id``, the overridden values), made in the emulator's store directly (for an
    existing subscription; the emulator takes ``plan_overrides`` through the API too)."""
    store = fake.store
    sub = next(s for s in store.subscriptions if s["external_id"] == external_id and s["status"] == "active")
    parent = store._plans_by_id[sub["plan_id"]]
    child = copy.deepcopy(parent)
    child.update(plan_fields, lago_id=f"override-of-{parent['lago_id']}")
    store._plans_by_id[child["lago_id"]] = child
    sub["plan_id"] = child["lago_id"]


def migrate(fake: FakeLago, tmp_path: Path, rows: str, *argv: str) -> tuple[int, str, str, Any]:
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("user_id,org_id,org_name,email\n" + rows, encoding="utf-8")
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)
    out, err = io.StringIO(), io.StringIO()
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    args = parse("--mapping-file", str(mapping), "--report", str(report), *argv)
    code = run_migrate_command(args, transport=fake.transport(), settings=settings, stdout=out, stderr=err)
    loaded = json.loads(report.read_text()) if report.exists() else None
    return code, out.getvalue(), err.getvalue(), loaded


def statuses(fake: FakeLago) -> dict[str, tuple[str, str, int]]:
    return {
        s["external_id"]: (s["status"], s["plan_code"], s["plan_amount_cents"])
        for s in fake.subscriptions
        if s["status"] in ("active", "pending")
    }


# --- a price of its own (plan_overrides) ---------------------------------------------------------------------------


def test_a_user_s_negotiated_price_is_not_replaced_by_the_plan_s_list_price(fake: FakeLago, tmp_path: Path) -> None:
    """An enterprise user pays 5,000 USD a month on the ``enterprise`` plan (list price 0) through Lago's
    ``plan_overrides``. The migration used to subscribe the org to ``enterprise`` at its list price and terminate
    the user's subscription: the org was billed nothing from then on, and --verify said OK. Lago cannot copy a plan
    override, so the org fails before any write, saying what to do, and the user stays billed as before."""
    fake.add_customer("ursula", name="Ursula")
    fake.add_subscription("ursula", "enterprise", external_id="sub_ursula")
    price_override(fake, "sub_ursula", amount_cents=500_000)
    before = fake.snapshot()

    code, out, _, report = migrate(fake, tmp_path, "ursula,acme,Acme,billing@acme.test\n")
    assert code == 1 and fake.snapshot() == before  # the dry run says so
    (error,) = report["orgs"][0]["errors"]
    assert "sub_ursula" in error and "plan_overrides" in error and "500000" in error

    code, out, _, report = migrate(fake, tmp_path, "ursula,acme,Acme,billing@acme.test\n", "--execute")
    assert code == 1, out
    assert report["orgs"][0]["status"] == "failed"
    assert statuses(fake) == {"sub_ursula": ("active", "enterprise", 500_000)}  # still billed, nothing written
    assert [r for r in fake.write_requests if r.path.startswith("/api/")] == []

    # What the error says to do: make the org subscription with the same overrides, then run again.
    fake.add_subscription("acme", "enterprise", external_id="acme")
    price_override(fake, "acme", amount_cents=500_000)
    code, out, _, _ = migrate(fake, tmp_path, "ursula,acme,Acme,billing@acme.test\n", "--execute")
    assert code == 0, out
    assert statuses(fake) == {"acme": ("active", "enterprise", 500_000)}


def test_the_highest_policy_compares_what_each_user_really_pays(fake: FakeLago, tmp_path: Path) -> None:
    """Of two users, one pays 5,000 USD a month through an override of the free-listed ``enterprise`` plan, the other
    50 USD on ``pro``: ``highest`` must not take ``pro`` (by list prices) and end the 5,000 USD contract."""
    fake.add_customer("ursula")
    fake.add_subscription("ursula", "enterprise", external_id="sub_ursula")
    price_override(fake, "sub_ursula", amount_cents=500_000)
    fake.add_customer("paul")
    fake.add_subscription("paul", "pro", external_id="sub_paul")

    code, out, _, _ = migrate(fake, tmp_path, "ursula,acme,Acme,\npaul,acme,Acme,\n", "--execute")
    assert code == 1, out
    assert statuses(fake) == {"sub_ursula": ("active", "enterprise", 500_000), "sub_paul": ("active", "pro", 5_000)}


def test_an_override_of_the_charges_only_is_found_too(fake: FakeLago, tmp_path: Path) -> None:
    """Same subscription fee as the plan, but the subscription has a plan of its own (its charges' prices
    overridden): the org would get the plan's charges."""
    fake.add_customer("ursula")
    fake.add_subscription("ursula", "pro", external_id="sub_ursula")
    price_override(fake, "sub_ursula")  # (the same amount: only the child plan tells)

    code, out, _, report = migrate(fake, tmp_path, "ursula,acme,Acme,\n", "--execute")
    assert code == 1, out
    assert "plan_overrides" in report["orgs"][0]["errors"][0]
    assert statuses(fake) == {"sub_ursula": ("active", "pro", 5_000)}


def test_an_override_the_org_does_not_take_is_named_in_a_warning(fake: FakeLago, tmp_path: Path) -> None:
    """The mapping gives the org its plan (``plan_code``): the user's own price is not carried, and the run says so
    rather than dropping it silently."""
    fake.add_customer("ursula")
    fake.add_subscription("ursula", "pro", external_id="sub_ursula")
    price_override(fake, "sub_ursula", amount_cents=4_000)
    mapping = tmp_path / "plans.csv"
    mapping.write_text("user_id,org_id,org_name,email,plan_code\nursula,acme,Acme,,pro\n", encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    args = parse("--mapping-file", str(mapping), "--execute")
    assert run_migrate_command(args, transport=fake.transport(), settings=settings, stdout=out, stderr=err) == 0
    assert "sub_ursula" in out.getvalue() and "plan_overrides" in out.getvalue()
    assert statuses(fake) == {"acme": ("active", "pro", 5_000)}


# --- a fixed end date -----------------------------------------------------------------------------------------------


def test_a_fixed_term_subscription_s_end_date_goes_to_the_org(fake: FakeLago, tmp_path: Path) -> None:
    """A user's subscription ends on 30 June (a one-off contract, ``ending_at``). The org subscription made from it
    used to renew for ever: the org was billed past the contract's end."""
    fake.add_customer("ursula")
    fake.add_subscription("ursula", "pro", external_id="sub_ursula", ending_at="2026-06-30T00:00:00Z")

    code, out, _, _ = migrate(fake, tmp_path, "ursula,acme,Acme,\n")
    assert code == 0 and "2026-06-30" in out  # the dry run shows it

    code, out, _, _ = migrate(fake, tmp_path, "ursula,acme,Acme,\n", "--execute")
    assert code == 0, out
    (org,) = [s for s in fake.subscriptions if s["external_id"] == "acme"]
    assert (org["status"], org["ending_at"]) == ("active", "2026-06-30T00:00:00Z")


# --- the unused part of a period paid in advance --------------------------------------------------------------------


def test_a_credit_left_on_a_user_customer_that_is_never_invoiced_again_is_warned_of(
    fake: FakeLago, tmp_path: Path
) -> None:
    """A user paid March in advance. Terminated on the 10th with Lago's default (``credit``), the unused days become a
    credit of the *user* customer, which the migration leaves without a subscription: no invoice will ever use it,
    while the org pays the rest of March again on its own subscription. The dry run must say so and how to choose."""
    fake.add_plan("pro_upfront", amount_cents=5_000, pay_in_advance=True)
    fake.add_customer("ursula")
    fake.add_subscription("ursula", "pro_upfront", external_id="sub_ursula")

    code, _, _, report = migrate(fake, tmp_path, "ursula,acme,Acme,\n")
    assert code == 0
    (warning,) = [w for w in report["orgs"][0]["warnings"] if "sub_ursula" in w]
    assert "--on-termination-credit-note" in warning and "credit" in warning

    code, _, _, report = migrate(fake, tmp_path, "ursula,acme,Acme,\n", "--on-termination-credit-note", "refund")
    assert code == 0 and not any("sub_ursula" in w for w in report["orgs"][0]["warnings"])
