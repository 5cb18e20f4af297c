"""What the seed (the in-house ``lago_integration`` module and its ``migrate_lago_to_org_billing.py`` script) promises,
where this package did not keep it: its functions raise ``LagoIntegrationError`` and lose nothing they are given; the
migration script's ``get_user_to_org_mapping()`` (here ``--mapping-callable``) failing is an error the script reports;
``migrate_user_to_org``, called once per user as the seed's API is, says nothing false about the org's other users."""

from __future__ import annotations

import argparse
import io
import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from lago_org_billing import BillingSettings, InvalidRequestError, LagoClient, OrgBilling
from lago_org_billing._migration_cli import add_migrate_command, run_migrate_command
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


@pytest.fixture
async def billing(fake_lago: Any, lago_client: LagoClient) -> AsyncIterator[OrgBilling]:
    """OrgBilling over the emulator, with plans ``starter`` (10 USD) and ``pro`` (50 USD)."""
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_plan("pro", amount_cents=5000)
    async with OrgBilling(client=lago_client) as service:
        yield service


# ------------------------------------------------------------------------------------- customer metadata


LAGO_ITEMS = [{"key": "tier", "value": "gold"}, {"key": "region", "value": "eu"}]


@pytest.mark.parametrize("metadata", [LAGO_ITEMS, "tier=gold", [("tier", "gold")]], ids=["lago-items", "str", "pairs"])
async def test_create_org_customer_refuses_metadata_that_is_no_mapping(
    fake_lago: Any, billing: OrgBilling, metadata: Any
) -> None:
    """create_org_customer's metadata that is not a {key: value} mapping is refused, nothing written.

    Lago's own item list ([{"key": ..., "value": ...}]) was read as pairs: both items were stored as one item
    {"key": "value"}, the org's metadata lost without an error; a string raised ValueError, which is no
    LagoIntegrationError (the seed: every function that modifies data raises LagoIntegrationError)."""
    with pytest.raises(InvalidRequestError, match="metadata must be a mapping"):
        await billing.create_org_customer("org_1", "Acme", "billing@acme.test", "u1", metadata)
    assert fake_lago.write_requests == []


@pytest.mark.parametrize("metadata", [LAGO_ITEMS, "tier=gold"], ids=["lago-items", "str"])
async def test_update_org_customer_refuses_metadata_that_is_no_mapping(
    fake_lago: Any, billing: OrgBilling, metadata: Any
) -> None:
    """update_org_customer's metadata that is not a {key: value} mapping is refused, nothing written (the same
    defect as create_org_customer's: a ValueError, or Lago's item list stored as {"key": "value"})."""
    await billing.create_org_customer("org_1", "Acme", user_id="u1")
    writes = len(fake_lago.write_requests)
    with pytest.raises(InvalidRequestError, match="metadata must be a mapping"):
        await billing.update_org_customer("org_1", "Acme", None, metadata)
    assert len(fake_lago.write_requests) == writes
    customer = await billing.get_customer("org_1")
    assert customer is not None and {item["key"] for item in customer["metadata"]} == {
        "billing_type",
        "created_by_user_id",
    }


async def test_a_mapping_of_metadata_is_still_taken(billing: OrgBilling) -> None:
    """The check refuses only what is no mapping: a dict is stored item by item, as before."""
    customer = await billing.create_org_customer("org_1", "Acme", metadata={"tier": "gold"})
    assert {item["key"]: item["value"] for item in customer["metadata"]}["tier"] == "gold"
    updated = await billing.update_org_customer("org_1", metadata={"tier": None, "region": "eu"})
    assert {item["key"] for item in updated["metadata"]} == {"billing_type", "region"}


# ------------------------------------------------------------------------- the mapping of the migration


def failing_mapping() -> list[dict[str, str]]:
    """A mapping callable whose database is down, as the seed's get_user_to_org_mapping() query can be."""
    raise ConnectionError("could not connect to server: Connection refused")


async def failing_mapping_async() -> list[dict[str, str]]:
    """The same, as an async query."""
    raise ConnectionError("could not connect to server: Connection refused")


def failing_rows() -> Any:
    """A cursor failing after its first row."""
    yield {"user_id": "u1", "org_id": "acme", "org_name": "Acme", "email": "a@acme.test"}
    raise ConnectionError("server closed the connection unexpectedly")


@pytest.mark.parametrize("function", ["failing_mapping", "failing_mapping_async", "failing_rows"])
def test_a_mapping_callable_that_fails_is_reported_like_an_unreadable_mapping_file(
    tmp_path: Path, function: str
) -> None:
    """``migrate --mapping-callable module:function`` whose function raises exits 2 with the error on one line and the
    --report written, nothing sent to Lago, as an unreadable --mapping-file does. It raised out of the command: a
    traceback, exit 1 and no report (a script reading the report found none)."""
    fake = FakeLago(api_key="k")
    report = tmp_path / "report.json"
    code, _, err = migrate(fake, "--mapping-callable", f"{__name__}:{function}", "--execute", "--report", str(report))
    assert code == 2
    assert f"--mapping-callable '{__name__}:{function}' failed: ConnectionError: " in err
    assert "Traceback" not in err
    problems = json.loads(report.read_text())["problems"]
    assert problems and "ConnectionError" in problems[0]
    assert fake.write_requests == []


def test_a_mapping_module_that_fails_to_import_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mapping module raising at import (its database connection made at module level) is reported as one that
    cannot be found is (exit 2, one line), not raised out of the command."""
    (tmp_path / "broken_mapping_module.py").write_text(
        "raise ConnectionError('could not connect to server')\ndef rows():\n    return []\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_mapping_module", raising=False)
    code, _, err = migrate(FakeLago(api_key="k"), "--mapping-callable", "broken_mapping_module:rows")
    assert code == 2
    assert "--mapping-callable 'broken_mapping_module:rows' failed: ConnectionError: could not connect" in err


def migrate(fake: FakeLago, *argv: str) -> tuple[int, str, str]:
    """``lago-org-billing migrate ARGV`` run in process against ``fake``: exit code, stdout, stderr."""
    parser = argparse.ArgumentParser()
    add_migrate_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["migrate", "--progress", "none", *argv])
    settings = BillingSettings(api_url=fake.base_url, api_key=fake.api_key)
    out, err = io.StringIO(), io.StringIO()
    code = run_migrate_command(args, transport=fake.transport(), settings=settings, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------- migrate_user_to_org, one user at a time


async def _user(billing: OrgBilling, user_id: str, plan_code: str) -> None:
    await billing.client.upsert_customer({"external_id": user_id, "name": user_id, "currency": "USD"})
    await billing.client.create_subscription(
        external_customer_id=user_id, plan_code=plan_code, external_id=f"sub_{user_id}"
    )


async def test_migrating_an_orgs_users_one_at_a_time_says_nothing_false_about_the_others(billing: OrgBilling) -> None:
    """The seed's ``migrate_user_to_org`` moves one user: called for each user of an org, the second call warned that
    the first was "no longer mapped" to the org and to terminate its subscription "if none of its users is left",
    although nothing said the first had left it. Both users are migrated, the org subscribed once, no such warning."""
    await _user(billing, "user_1", "starter")
    await _user(billing, "user_2", "starter")
    first = await billing.migrate_user_to_org("user_1", "org_a", "Acme", "billing@acme.test")
    second = await billing.migrate_user_to_org("user_2", "org_a", "Acme", "billing@acme.test")
    assert first["terminated_subscriptions"] == ["sub_user_1"] and second["terminated_subscriptions"] == ["sub_user_2"]
    assert second["plan_code"] == "starter"
    assert not [warning for warning in second["warnings"] if "no longer mapped" in warning], second["warnings"]
    customer = await billing.get_customer("org_a")
    assert customer is not None
    assert {item["key"]: item["value"] for item in customer["metadata"]}["migrated_from_user"] == "user_1,user_2"
    again = await billing.migrate_user_to_org("user_1", "org_a", "Acme", "billing@acme.test")
    assert again["changed"] is False and not [w for w in again["warnings"] if "no longer mapped" in w]


def test_a_mapping_run_still_warns_of_a_user_no_longer_mapped_to_its_org(tmp_path: Path) -> None:
    """The warning stays where it is true: a mapping (every user of the org) that no longer names a user an earlier
    run migrated to the org."""
    fake = FakeLago(api_key="k")
    fake.add_plan("starter", amount_cents=1000)
    settings = BillingSettings(api_url=fake.base_url, api_key="k")

    async def users() -> None:
        async with OrgBilling(settings, transport=fake.transport()) as billing:
            await _user(billing, "user_1", "starter")
            await _user(billing, "user_2", "starter")

    anyio.run(users)
    rows = [
        {"user_id": user, "org_id": "org_a", "org_name": "Acme", "email": "billing@acme.test"}
        for user in ("user_1", "user_2")
    ]
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps(rows), encoding="utf-8")
    assert migrate(fake, "--mapping-file", str(mapping), "--execute")[0] == 0
    mapping.write_text(json.dumps(rows[:1]), encoding="utf-8")
    _, out, _ = migrate(fake, "--mapping-file", str(mapping), "--execute")
    assert "'user_2' (its customer's migrated_from_user), no longer mapped to it" in out


# ------------------------------------------------------------------- a database query's own id types


def integer_and_uuid_rows() -> list[dict[str, Any]]:
    """A mapping callable as a database query returns its rows: integer user ids, UUID org ids."""
    return [
        {"user_id": 42, "org_id": uuid.UUID(_ORG_UUID), "org_name": "Acme", "email": "a@acme.test"},
        {"user_id": 43, "org_id": uuid.UUID(_ORG_UUID), "org_name": "Acme", "email": "b@acme.test"},
    ]


def boolean_and_float_rows() -> list[dict[str, Any]]:
    """Ids no database key is: a bool, a float (1e3 would be "1000.0"): still refused."""
    return [{"user_id": True, "org_id": 1.5, "org_name": "Acme", "email": "a@acme.test"}]


_ORG_UUID = "6f1c2b3a-0d4e-4f5a-9b8c-7d6e5f4a3b2c"


def test_a_mapping_callable_may_give_integer_and_uuid_ids_as_its_database_does(tmp_path: Path) -> None:
    """``--mapping-callable`` rows with integer user ids and UUID org ids (a query's column types) are read as their
    text, the ids the app keyed its Lago customers with (``str(user.id)``): refused before with "must be a string
    (quote it)", a hint for JSON files, when the rows come from code."""
    fake = FakeLago(api_key="k")
    code, out, err = migrate(fake, "--mapping-callable", f"{__name__}:integer_and_uuid_rows")
    assert code == 0, err
    assert _ORG_UUID in out and "must be a string" not in err


def test_a_mapping_callable_giving_bools_or_floats_for_ids_is_still_refused(tmp_path: Path) -> None:
    """A bool or a float id from a mapping callable is refused, as from a file: their text is no key anyone keyed a
    customer with."""
    code, _, err = migrate(FakeLago(api_key="k"), "--mapping-callable", f"{__name__}:boolean_and_float_rows")
    assert code == 2
    assert "user_id must be a string" in err and "org_id must be a string" in err
