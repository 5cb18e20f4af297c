"""OrgBilling, the seed's org-keyed API, against the Lago emulator."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from lago_org_billing import (
    BillingSettings,
    InvalidIdentifierError,
    InvalidRequestError,
    LagoAPIError,
    LagoClient,
    LagoNotFoundError,
    OrgBilling,
)
from lago_org_billing._billing import customer_metadata

pytestmark = pytest.mark.anyio


@pytest.fixture
async def billing(fake_lago: Any, lago_client: LagoClient) -> AsyncIterator[OrgBilling]:
    """OrgBilling over the emulator, seeded with an api_call metric and two plans."""
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    charge = {
        "billable_metric_code": "api_call",
        "charge_model": "standard",
        "properties": {"amount": "0.001", "pricing_group_keys": ["user_id"]},
    }
    fake_lago.add_plan("starter", amount_cents=1000, charges=[charge])
    fake_lago.add_plan("pro", amount_cents=5000, charges=[charge])
    async with OrgBilling(client=lago_client) as service:
        yield service


def metadata_of(customer: dict[str, Any]) -> dict[str, str]:
    return {item["key"]: item["value"] for item in customer["metadata"]}


async def test_create_org_customer_keys_by_org(billing: OrgBilling) -> None:
    """The customer's external_id is the org id; creator and billing type go in metadata."""
    customer = await billing.create_org_customer("org_1", "Acme", "billing@acme.test", user_id="user_7")
    assert customer["external_id"] == "org_1"
    assert customer["name"] == "Acme"
    assert metadata_of(customer) == {"created_by_user_id": "user_7", "billing_type": "organization"}
    assert await billing.is_org_customer("org_1")


async def test_create_twice_keeps_metadata(billing: OrgBilling) -> None:
    """Creating again updates in place and drops no metadata item."""
    await billing.create_org_customer("org_1", "Acme", user_id="user_7", metadata={"tier": "gold"})
    again = await billing.create_org_customer("org_1", "Acme 2", metadata={"region": "eu"})
    assert again["name"] == "Acme 2"
    assert metadata_of(again) == {
        "created_by_user_id": "user_7",
        "billing_type": "organization",
        "tier": "gold",
        "region": "eu",
    }


async def test_metadata_limits_checked_before_any_call(fake_lago: Any, billing: OrgBilling) -> None:
    """Metadata Lago would refuse is a clear error and nothing is written."""
    before = len(fake_lago.write_requests)
    with pytest.raises(InvalidRequestError, match="at most 5"):
        await billing.create_org_customer("org_1", "Acme", metadata={f"k{i}": "v" for i in range(5)})
    with pytest.raises(InvalidRequestError, match="20"):
        await billing.create_org_customer("org_1", "Acme", metadata={"a_key_that_is_far_too_long": "v"})
    with pytest.raises(InvalidRequestError, match="100"):
        await billing.create_org_customer("org_1", "Acme", metadata={"k": "v" * 101})
    with pytest.raises(InvalidRequestError, match="string"):
        await billing.create_org_customer("org_1", "Acme", metadata={"k": 5})
    assert len(fake_lago.write_requests) == before


async def test_update_merges_and_removes_metadata(billing: OrgBilling) -> None:
    """update_org_customer merges metadata; None removes a key; other fields stay."""
    await billing.create_org_customer("org_1", "Acme", "a@acme.test", user_id="u1", metadata={"tier": "gold"})
    updated = await billing.update_org_customer("org_1", metadata={"tier": "platinum", "region": "eu"})
    assert metadata_of(updated)["tier"] == "platinum" and metadata_of(updated)["region"] == "eu"
    assert metadata_of(updated)["created_by_user_id"] == "u1"
    assert updated["email"] == "a@acme.test"
    removed = await billing.update_org_customer("org_1", metadata={"region": None})
    assert "region" not in metadata_of(removed)
    with pytest.raises(LagoNotFoundError, match="create_org_customer"):
        await billing.update_org_customer("org_missing", org_name="X")


async def test_get_customer_and_get_or_create(billing: OrgBilling) -> None:
    """get_customer is None when absent; get_or_create creates once."""
    assert await billing.get_customer("org_1") is None
    first = await billing.get_or_create_customer("org_1", "Acme", "a@acme.test", "u1")
    second = await billing.get_or_create_customer("org_1", "Other name", "b@acme.test", "u2")
    assert first["lago_id"] == second["lago_id"] and second["name"] == "Acme"


async def test_subscribe_change_plan_and_terminate(billing: OrgBilling) -> None:
    """subscribe_org_to_plan sets up customer and subscription; change_plan upgrades; terminate ends it."""
    result = await billing.subscribe_org_to_plan("org_1", "starter", "Acme", "a@acme.test", "u1")
    assert result["customer"]["external_id"] == "org_1"
    assert result["subscription"]["external_id"] == "org_1"
    assert (await billing.get_subscription("org_1"))["plan_code"] == "starter"  # type: ignore[index]
    upgraded = await billing.change_plan("org_1", "pro")
    assert upgraded["plan_code"] == "pro"
    terminated = await billing.terminate_subscription("org_1")
    assert terminated["status"] == "terminated"
    assert await billing.get_subscription("org_1") is None
    with pytest.raises(LagoNotFoundError, match="no active subscription"):
        await billing.change_plan("org_1", "pro")


async def test_subscribe_completes_an_existing_customer_without_overwriting_it(billing: OrgBilling) -> None:
    """A bare customer (Lago makes one when a subscription comes first, as the seed's create_subscription does) gets
    the name, email, org marker and creator it lacks; what it has is kept."""
    await billing.create_subscription("org_9", "starter")
    result = await billing.subscribe_org_to_plan("org_9", "starter", "Org Nine", "nine@x.test", user_id="u1")
    customer = result["customer"]
    assert (customer["name"], customer["email"]) == ("Org Nine", "nine@x.test")
    assert customer_metadata(customer) == {"billing_type": "organization", "created_by_user_id": "u1"}
    assert await billing.is_org_customer("org_9")
    again = await billing.subscribe_org_to_plan("org_9", "starter", "Renamed", "other@x.test", user_id="u2")
    assert (again["customer"]["name"], again["customer"]["email"]) == ("Org Nine", "nine@x.test")
    assert customer_metadata(again["customer"])["created_by_user_id"] == "u1"


async def test_change_plan_of_a_subscription_that_has_not_started(fake_lago: Any, billing: OrgBilling) -> None:
    """A subscription starting later (pending) changes plan in place (Lago's POST /subscriptions does so), still
    starting then; with neither an active nor a pending one, change_plan says to create one."""
    later = (fake_lago.now() + dt.timedelta(days=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    await billing.subscribe_org_to_plan("org_1", "starter", "Org One", subscription_at=later)
    changed = await billing.change_plan("org_1", "pro")
    assert (changed["plan_code"], changed["status"]) == ("pro", "pending")
    assert changed["subscription_at"].startswith(later[:19])
    with pytest.raises(LagoNotFoundError, match="use create_subscription"):
        await billing.change_plan("org_2", "pro")


async def test_subscription_id_template(fake_lago: Any, lago_client: LagoClient) -> None:
    """LAGO_SUBSCRIPTION_ID_TEMPLATE decides the subscription external_id."""
    fake_lago.add_plan("starter", amount_cents=1000)
    settings = lago_client.settings.replace(subscription_id_template="{org_id}_main")
    async with OrgBilling(settings, client=lago_client) as billing:
        sub = await billing.create_subscription("org_1", "starter")
        assert sub["external_id"] == "org_1_main"
        assert (await billing.get_subscription("org_1"))["external_id"] == "org_1_main"  # type: ignore[index]


async def test_record_usage_and_current_usage(fake_lago: Any, billing: OrgBilling) -> None:
    """record_usage/record_api_call add org_id and reach current usage; duplicates are not errors."""
    await billing.subscribe_org_to_plan("org_1", "starter", "Acme")
    await billing.record_usage("org_1", "api_call", "tx_1", {"total_tokens": 7, "user_id": "u1"})
    dup = await billing.record_usage("org_1", "api_call", "tx_1", {"total_tokens": 7, "user_id": "u1"})
    assert dup["duplicate"] is True
    await billing.record_api_call("org_1", "tx_2", "/v1/chat/{id}", "u2", tokens=5, model="gpt-4o")
    await billing.record_api_call("org_1", None, "/v1/chat/{id}", "u2", input_tokens=2, output_tokens=3)
    events = fake_lago.events
    assert all(e["properties"]["org_id"] == "org_1" for e in events)
    assert events[1]["properties"]["model"] == "gpt-4o" and events[1]["properties"]["endpoint"] == "/v1/chat/{id}"
    assert events[2]["properties"]["total_tokens"] == 5
    usage = await billing.get_current_usage("org_1")
    assert usage is not None
    assert float(usage["charges_usage"][0]["units"]) == 17
    assert await billing.get_current_usage("org_unknown") is None


async def test_record_api_call_rejects_bad_tokens(billing: OrgBilling) -> None:
    """Negative or non-integer token counts are refused before sending."""
    with pytest.raises(InvalidRequestError):
        await billing.record_api_call("org_1", tokens=-1)
    with pytest.raises(InvalidRequestError):
        await billing.record_api_call("org_1", tokens=1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="2\\*\\*53"):  # 10**30 was sent (and broke the emulator's usage)
        await billing.record_api_call("org_1", tokens=10**30)


async def test_get_invoices_limit(fake_lago: Any, billing: OrgBilling) -> None:
    """get_invoices returns at most `limit` invoices of that org."""
    fake_lago.add_customer("org_1", name="Acme")
    for _ in range(7):
        fake_lago.add_invoice("org_1")
    assert len(await billing.get_invoices("org_1", limit=5)) == 5
    assert len(await billing.get_invoices("org_1", limit=50)) == 7
    with pytest.raises(InvalidRequestError):
        await billing.get_invoices("org_1", limit=0)


async def test_is_org_customer_false_for_users(fake_lago: Any, billing: OrgBilling) -> None:
    """A legacy user-keyed customer and an unknown id are not org customers."""
    fake_lago.add_customer("user_1", name="Ada")
    assert not await billing.is_org_customer("user_1")
    assert not await billing.is_org_customer("nobody")


async def test_migrate_user_to_org(fake_lago: Any, billing: OrgBilling) -> None:
    """A user's subscription moves to the org; a re-run changes nothing."""
    fake_lago.add_customer("user_1", name="Ada", email="ada@acme.test")
    fake_lago.add_subscription("user_1", "pro", external_id="user_1_sub")
    outcome = await billing.migrate_user_to_org("user_1", "org_1", "Acme", "billing@acme.test")
    assert outcome["changed"]
    assert (await billing.get_subscription("org_1"))["plan_code"] == "pro"  # type: ignore[index]
    assert (await billing.client.list_subscriptions(external_customer_id="user_1")).items == []
    org = await billing.get_customer("org_1")
    assert org is not None and metadata_of(org)["migrated_from_user"] == "user_1"
    writes = len(fake_lago.write_requests)
    again = await billing.migrate_user_to_org("user_1", "org_1", "Acme", "billing@acme.test")
    assert not again["changed"]
    assert len(fake_lago.write_requests) == writes


async def test_bad_org_ids_rejected_early(billing: OrgBilling) -> None:
    """Dotted or empty org ids never reach Lago."""
    with pytest.raises(InvalidIdentifierError):
        await billing.create_org_customer("acme.com", "Acme")
    with pytest.raises(InvalidIdentifierError):
        await billing.get_subscription("")


async def test_health_reports_instead_of_raising(fake_lago: Any, billing: OrgBilling) -> None:
    """check_lago_health says healthy, and reports (not raises) when Lago is unreachable."""
    health = await billing.check_lago_health()
    assert health["healthy"] is True and health["version"]
    settings = BillingSettings(api_url="http://127.0.0.1:9", api_key="k", max_retries=0)
    async with OrgBilling(settings) as down:
        report = await down.check_lago_health()
    assert report["healthy"] is False and "LAGO_API_URL" in report["error"]
    wrong_key = BillingSettings(api_url=fake_lago.base_url, api_key="not-the-key", max_retries=0)
    async with OrgBilling(wrong_key, client=LagoClient(wrong_key, transport=fake_lago.transport())) as refused:
        report = await refused.check_lago_health()  # Lago's /health needs no key: the key is checked apart
    assert report["healthy"] is False and "refuses this API key" in report["error"]


async def test_nowait_recording_goes_through_the_pipeline(fake_lago: Any, billing: OrgBilling) -> None:
    """record_*_nowait return at once and the pipeline delivers the events."""
    from lago_org_billing._delivery import EventPipeline

    await billing.subscribe_org_to_plan("org_1", "starter", "Acme")
    with pytest.raises(Exception, match="pipeline"):
        billing.record_usage_nowait("org_1", "api_call")
    async with EventPipeline(billing.client) as pipeline:
        billing.pipeline = pipeline
        tx = billing.record_api_call_nowait("org_1", None, "/v1/chat", "u1", tokens=9, model="m")
        billing.record_usage_nowait("org_1", "api_call", "tx_fixed", {"total_tokens": 1})
        assert await pipeline.flush(5)
    assert {e["transaction_id"] for e in fake_lago.events} == {tx, "tx_fixed"}
    assert all(e["properties"]["org_id"] == "org_1" for e in fake_lago.events)


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(404, text="<html>404 Not Found</html>", headers={"content-type": "text/html"}),
        httpx.Response(301, headers={"location": "https://lago.example/api/v1/customers/acme"}),
    ],
)
async def test_a_wrong_lago_url_is_an_error_not_an_org_without_billing(answer: httpx.Response) -> None:
    """A proxy's 404 page or a redirect (http to https) made get_customer answer None: "no billing" for an org set
    up in Lago, and the quota gate answer 402 to all of them."""
    settings = BillingSettings(api_url="http://lago.example", api_key="k", max_retries=0)
    transport = httpx.MockTransport(lambda request: answer)
    async with OrgBilling(settings, client=LagoClient(settings, transport=transport)) as billing:
        for call in (billing.get_customer("acme"), billing.get_subscription("acme")):
            with pytest.raises(LagoAPIError, match="LAGO_API_URL") as info:
                await call
            assert not isinstance(info.value, LagoNotFoundError)


async def test_creator_and_owner_are_kept(fake_lago: Any, billing: OrgBilling) -> None:
    """A second create_org_customer with another user overwrote created_by_user_id; terminate_subscription with
    another org's subscription id terminated it."""
    await billing.subscribe_org_to_plan("org_a", "starter", "A", user_id="founder")
    await billing.create_org_customer("org_a", "A", user_id="later_admin")
    customer = await billing.get_customer("org_a")
    assert customer is not None
    assert {i["key"]: i["value"] for i in customer["metadata"]}["created_by_user_id"] == "founder"
    await billing.subscribe_org_to_plan("org_b", "starter", "B")
    with pytest.raises(InvalidRequestError, match="not org 'org_a'"):
        await billing.terminate_subscription("org_a", "org_b")
    assert await billing.get_subscription("org_b") is not None
    await billing.terminate_subscription("org_a", "org_a")
    assert await billing.get_subscription("org_a") is None


async def test_a_retried_record_usage_is_one_event_on_the_clickhouse_store() -> None:
    """ClickHouse deduplicates on transaction_id and timestamp: a retry stamped "now" again was a second event."""
    from lago_org_billing.testing import FakeLago

    fake = FakeLago(api_key="k", event_store="clickhouse")
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with OrgBilling(settings, client=LagoClient(settings, transport=fake.transport())) as billing:
        for _ in range(2):
            await billing.record_usage("org_a", "api_call", "tx_retry", {"total_tokens": 100})
    assert [event["transaction_id"] for event in fake.events] == ["tx_retry"]


async def test_creating_an_org_customer_created_meanwhile_updates_it(
    fake_lago: Any, billing: OrgBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A double-submitted setup, or a retry after a lost answer: the customer appears between the check and the
    create, whose metadata keys then exist (422 value_already_exist). It failed; it updates that customer now."""
    await billing.create_org_customer("org_new", "New", user_id="u1")  # the other call's create
    real = billing.get_customer
    seen: list[str] = []

    async def not_yet(org_id: str) -> Any:  # what this call saw before the other call created it
        seen.append(org_id)
        return None if len(seen) == 1 else await real(org_id)

    monkeypatch.setattr(billing, "get_customer", not_yet)
    customer = await billing.create_org_customer("org_new", "New", user_id="u2")
    assert {i["key"]: i["value"] for i in customer["metadata"]}["created_by_user_id"] == "u1"


async def test_changing_back_to_the_current_plan_cancels_a_scheduled_downgrade(billing: OrgBilling) -> None:
    """Lago answers a change to the current plan with the subscription unchanged: a downgrade scheduled for the
    period end stayed, while the routes said the change took effect now."""
    await billing.subscribe_org_to_plan("org_1", "pro", "Acme")
    downgrade = await billing.change_plan("org_1", "starter")
    assert downgrade["plan_code"] == "pro" and downgrade["next_plan_code"] == "starter"
    back = await billing.change_plan("org_1", "pro")
    assert back["plan_code"] == "pro" and not back.get("next_plan_code")
    assert billing.client is not None
    pending = await billing.client.list_subscriptions(external_customer_id="org_1", statuses=["pending"])
    assert pending.items == []


async def test_a_subscription_not_started_yet_can_be_canceled(fake_lago: Any, billing: OrgBilling) -> None:
    await billing.create_org_customer("org_f", "Future")
    await billing.create_subscription("org_f", "starter", subscription_at="2099-01-01T00:00:00Z")
    ended = await billing.terminate_subscription("org_f")
    assert ended["status"] == "canceled"
