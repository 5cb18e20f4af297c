"""The migration across batches and runs, and the plan it picks: found by an audit of ``lago-org-billing migrate``.

- Ids of users and orgs from one sequence (``users.id`` 42, ``organizations.id`` 42): a first batch made org ``42``;
  a second batch mapping *user* ``42`` ended org 42's subscription as that user's and said OK. A user whose Lago
  customer is an org's (``billing_type=organization``) is refused, as an org id that is a migrated user's is.
- ``--journal`` naming the mapping file wrote the journal into it (``--report`` naming it was refused): refused.
- A journal matched orgs by URL, not by Lago organization: on Lago Cloud (one URL, an API key per organization) the
  journal of a staging run made the production run skip everything and say OK. The key is in the match, hashed.
- ``--plan-policy highest``/``lowest`` compared amounts in different currencies' subunits: refused, saying what to do.
- A user's ``incomplete`` subscription (waiting for a payment; Lago refuses to end it) was neither ended nor said, and
  ``--verify`` passed: said in the plan, an error of ``--verify`` until paid (then ended by a run) or canceled.
- The org subscription starts a new free trial of its plan: said, with how to bill the org from the cut-over.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from lago_org_billing.testing import FakeLago
from test_migration_cli import run_cli

KEY = "audit-key"


def migrate(fake: FakeLago, tmp: Path, *argv: str, key: str = KEY) -> tuple[int, str, str, Any]:
    """``run_cli`` (its ``fake.requests`` this run's only) with this file's key: exit code, stdout, stderr, report."""
    outcome = run_cli(fake, tmp, "report", *argv, "--progress", "none", api_key=key)
    return outcome.code, outcome.stdout, outcome.stderr, outcome.report


def csv_file(path: Path, *rows: str) -> str:
    path.write_text("user_id,org_id,org_name,email\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


def subs(fake: FakeLago) -> dict[tuple[str, str], str]:
    return {(s["external_id"], s["external_customer_id"]): s["status"] for s in fake.store.subscriptions}


def test_a_mapped_user_whose_customer_is_an_org_customer_is_refused(tmp_path: Path) -> None:
    fake = FakeLago(api_key=KEY)
    fake.add_plan("pro", amount_cents=5000)
    fake.add_customer("u1", name="U1", email="u1@x.test")
    fake.add_subscription("u1", "pro", external_id="sub_u1")
    assert (
        migrate(fake, tmp_path, "--mapping-file", csv_file(tmp_path / "b1.csv", "u1,42,Org 42,b@42.test"), "--execute")[
            0
        ]
        == 0
    )
    assert subs(fake)[("42", "42")] == "active"

    batch2 = csv_file(tmp_path / "b2.csv", "42,7,Org 7,b@7.test")
    for mode in ((), ("--execute",)):
        code, out, err, report = migrate(fake, tmp_path, "--mapping-file", batch2, *mode)
        assert code == 1, (out, err)
        assert subs(fake)[("42", "42")] == "active"  # org 42 still billed (it was terminated as user 42's)
        (org,) = report["orgs"]
        assert any("user_id '42'" in e and "org's" in e and "nothing was done" in e for e in org["errors"]), org
        assert all(r.method == "GET" for r in fake.requests)  # nothing written for org 7
    assert "7" not in {c["external_id"] for c in fake.customers}


def test_a_journal_that_is_the_mapping_file_is_refused(tmp_path: Path) -> None:
    """``--report`` naming the mapping file was refused, ``--journal`` naming it was not: the journal's lines were
    appended to the mapping, which every later run (``--verify``, a resume) refused as a broken mapping."""
    fake = FakeLago(api_key=KEY)
    fake.add_plan("pro", amount_cents=5000)
    fake.add_customer("u1", name="U1", email="u1@x.test")
    fake.add_subscription("u1", "pro", external_id="sub_u1")
    mapping = csv_file(tmp_path / "m.csv", "u1,org_a,Acme,a@acme.test")
    (tmp_path / "link.csv").symlink_to(mapping)
    before = Path(mapping).read_text(encoding="utf-8")
    for journal in (mapping, str(tmp_path / "link.csv"), str(tmp_path / "." / "m.csv")):
        code, _, err, _ = migrate(fake, tmp_path, "--mapping-file", mapping, "--execute", "--journal", journal)
        assert code == 2 and "is the mapping file" in err, err
        assert fake.requests == []  # (this run's)
    assert Path(mapping).read_text(encoding="utf-8") == before
    assert subs(fake)[("sub_u1", "u1")] == "active"


def test_a_journal_of_another_lago_organization_at_the_same_url_skips_nothing(tmp_path: Path) -> None:
    """Lago Cloud serves every organization at one URL, told apart by the API key: the journal of a staging run made
    the production run skip every org and say OK, nothing migrated. The key is part of what the journal matches (as
    a hash: the journal holds no secret)."""

    def lago(key: str) -> FakeLago:
        fake = FakeLago(api_key=key)  # (both at the same base_url, as two Cloud organizations)
        fake.add_plan("pro", amount_cents=5000)
        fake.add_customer("u1", name="U1", email="u1@x.test")
        fake.add_subscription("u1", "pro", external_id="sub_u1")
        return fake

    staging, production = lago("staging-key"), lago("production-key")
    mapping = csv_file(tmp_path / "m.csv", "u1,org_a,Acme,a@acme.test")
    journal = tmp_path / "journal.jsonl"
    for fake, key in ((staging, "staging-key"), (production, "production-key")):
        code, _, err, _ = migrate(
            fake, tmp_path, "--mapping-file", mapping, "--execute", "--journal", str(journal), key=key
        )
        assert code == 0, err
    assert "planned again" in err and "skipping" not in err, err
    for fake in (staging, production):
        assert subs(fake)[("sub_u1", "u1")] == "terminated" and subs(fake)[("org_a", "org_a")] == "active"
    assert "staging-key" not in journal.read_text() and "production-key" not in journal.read_text()
    # the same organization again: skipped, nothing asked of Lago but the run's checks
    code, _, err, _ = migrate(
        production, tmp_path, "--mapping-file", mapping, "--execute", "--journal", str(journal), key="production-key"
    )
    assert code == 0 and "1 orgs done before, skipping them" in err, err
    # a journal of an earlier version (its entries name no Lago organization) is read as before: done orgs skipped
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert all(entry.get("lago") for entry in entries)
    journal.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "lago"}) + "\n" for e in entries))
    code, _, err, _ = migrate(
        staging, tmp_path, "--mapping-file", mapping, "--journal", str(journal), key="staging-key"
    )
    assert code == 0 and "1 orgs done before, skipping them" in err, err


def test_the_highest_plan_is_not_picked_by_amounts_in_different_currencies(tmp_path: Path) -> None:
    """u1 pays 50.00 USD (5000 cents), u2 6,000 JPY (about 40 USD; a yen has no subunit: 6000): ``highest`` compared
    6000 with 5000 and gave the org the JPY plan, unsaid. The org is refused, saying what to do; with its plan named in
    the mapping, or a policy by date, it is migrated."""
    fake = FakeLago(api_key=KEY)
    fake.add_plan("pro_usd", amount_cents=5000, amount_currency="USD")
    fake.add_plan("pro_jpy", amount_cents=6000, amount_currency="JPY")
    fake.add_customer("u1", name="U1", email="u1@x.test", currency="USD")
    fake.add_subscription("u1", "pro_usd", external_id="sub_u1")
    fake.add_customer("u2", name="U2", email="u2@x.test", currency="JPY")
    fake.add_subscription("u2", "pro_jpy", external_id="sub_u2")
    mapping = csv_file(tmp_path / "m.csv", "u1,org_a,Acme,a@acme.test", "u2,org_a,Acme,a@acme.test")
    for policy in ("highest", "lowest"):
        code, out, _, report = migrate(fake, tmp_path, "--mapping-file", mapping, "--plan-policy", policy, "--execute")
        (org,) = report["orgs"]
        assert code == 1 and any("different currencies" in e and "JPY: u2's 'pro_jpy'" in e for e in org["errors"]), out
        assert subs(fake)[("sub_u1", "u1")] == "active" and ("org_a", "org_a") not in subs(fake)
    code, out, _, report = migrate(fake, tmp_path, "--mapping-file", mapping, "--plan-policy", "oldest")
    assert code == 0 and report["orgs"][0]["plan_code"] in ("pro_usd", "pro_jpy"), out  # (by date: a choice made)
    named = tmp_path / "named.csv"
    named.write_text(
        "user_id,org_id,org_name,email,plan_code\nu1,org_a,Acme,a@acme.test,pro_jpy\nu2,org_a,Acme,,pro_jpy\n"
    )
    code, out, _, report = migrate(fake, tmp_path, "--mapping-file", str(named), "--execute")
    assert code == 0 and subs(fake)[("org_a", "org_a")] == "active", out
    assert report["orgs"][0]["plan_code"] == "pro_jpy"


def test_a_users_incomplete_subscription_is_said_and_fails_verify(tmp_path: Path) -> None:
    """An ``incomplete`` subscription (payment-gated activation) starts, billing the user, once paid, and Lago refuses
    to end it meanwhile: the migration neither ended nor reported it, and ``--verify`` passed. The plan warns, and
    ``--verify`` fails until it is paid (then ended by a run) or canceled."""
    fake = FakeLago(api_key=KEY)
    fake.add_plan("starter", amount_cents=1000)
    fake.add_plan("pro", amount_cents=5000)
    for user in ("u1", "u2"):
        fake.add_customer(user, name=user, email=f"{user}@x.test")
    fake.add_subscription("u1", "starter", external_id="sub_u1")
    fake.add_subscription("u2", "pro", external_id="sub_u2")
    stored = next(s for s in fake.store.subscriptions if s["external_id"] == "sub_u2")
    stored["status"] = "incomplete"  # (the emulator makes none through its API)
    mapping = csv_file(tmp_path / "m.csv", "u1,org_a,Acme,a@acme.test", "u2,org_a,Acme,a@acme.test")
    code, out, _, report = migrate(fake, tmp_path, "--mapping-file", mapping, "--execute")
    assert code == 0 and any("incomplete subscription(s) sub_u2" in w for w in report["orgs"][0]["warnings"]), out
    code, out, _, report = migrate(fake, tmp_path, "--mapping-file", mapping, "--verify")
    assert code == 1 and any("incomplete subscription(s) sub_u2" in e for e in report["orgs"][0]["errors"]), out
    stored["status"] = "active"  # paid: it started, and the next run ends it
    code, out, _, report = migrate(fake, tmp_path, "--mapping-file", mapping, "--execute")
    assert code == 0 and subs(fake)[("sub_u2", "u2")] == "terminated", out
    assert migrate(fake, tmp_path, "--mapping-file", mapping, "--verify")[0] == 0
    stored["status"] = "incomplete"
    assert migrate(fake, tmp_path, "--mapping-file", mapping, "--verify")[0] == 1
    stored["status"] = "canceled"  # (its payment failed): nothing left to bill u2
    code, out, _, report = migrate(fake, tmp_path, "--mapping-file", mapping, "--verify")
    assert code == 0, out


def test_an_org_subscription_starting_a_new_trial_is_said(tmp_path: Path) -> None:
    """A user on ``pro`` (a 30-day trial) for 60 days pays its fee; the org subscription made from it starts a new
    30-day trial (Lago gives one to every new subscription): the org's first weeks went unbilled, unsaid. The plan
    warns, saying how to bill it from the cut-over; an org subscription made so (no trial) is kept."""
    now = [datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)]
    fake = FakeLago(api_key=KEY, clock=lambda: now[0])
    fake.add_plan("pro", amount_cents=5000, trial_period=30)
    fake.add_customer("u1", name="U1", email="u1@x.test", currency="USD")
    started = (now[0] - timedelta(days=60)).strftime("%Y-%m-%dT%H:%M:%SZ")
    fake.add_subscription("u1", "pro", external_id="sub_u1", subscription_at=started)
    mapping = csv_file(tmp_path / "m.csv", "u1,org_a,Acme,billing@acme.test")
    code, _, _, report = migrate(fake, tmp_path, "--mapping-file", mapping)
    (said,) = [w for w in report["orgs"][0]["warnings"] if "trial" in w]
    assert code == 0 and "30-day trial" in said and '{"trial_period": 0}' in said, said
    # as it says: the org subscribed first without a trial, then the migration keeps it
    fake.add_customer("org_a", name="Acme")
    fake.add_subscription("org_a", "pro", external_id="org_a", plan_overrides={"trial_period": 0})
    code, _, _, report = migrate(fake, tmp_path, "--mapping-file", mapping, "--execute")
    assert code == 0 and not [w for w in report["orgs"][0]["warnings"] if "trial" in w], report["orgs"][0]
    assert report["orgs"][0]["plan_source"] == "existing org subscription"
    assert subs(fake)[("sub_u1", "u1")] == "terminated" and subs(fake)[("org_a", "org_a")] == "active"


def test_no_trial_is_said_for_a_plan_without_one_or_users_starting_later(tmp_path: Path) -> None:
    fake = FakeLago(api_key=KEY)
    fake.add_plan("pro", amount_cents=5000)
    fake.add_plan("trialled", amount_cents=5000, trial_period=14)
    fake.add_customer("u1", name="U1", email="u1@x.test")
    fake.add_subscription("u1", "pro", external_id="sub_u1")
    fake.add_customer("u2", name="U2", email="u2@x.test")
    fake.add_subscription("u2", "trialled", external_id="sub_u2", subscription_at="2099-01-01T00:00:00Z")
    mapping = csv_file(tmp_path / "m.csv", "u1,org_a,A,a@a.test", "u2,org_b,B,b@b.test")
    code, out, _, report = migrate(fake, tmp_path, "--mapping-file", mapping)
    assert code == 0 and not [w for org in report["orgs"] for w in org["warnings"] if "trial" in w], out
