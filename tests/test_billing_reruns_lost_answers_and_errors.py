"""Review of ``OrgBilling`` (the seed's ``lago_integration`` functions) and the async ``LagoClient`` against the
emulator, as a production user re-runs and misconfigures them.

Covers: re-running ``subscribe_org_to_plan`` / ``create_subscription`` / ``change_plan`` for an org whose
subscription has negotiated ``plan_overrides`` (Lago reads the same plan code as another plan and replaced the
discounted subscription, billing it at once); ``terminate_subscription`` retried after an answer lost behind Lago's
commit (the retry the error advises was a ``LagoNotFoundError`` "create the resource first"); ``is_org_customer`` of a
legacy user customer keyed by an email (raised instead of answering False); a ``LAGO_API_URL`` under a path Lago is
not served at (Lago's catch-all ``404 resource_not_found`` read as "this org has no customer / subscription");
Lago's ``403 feature_unavailable`` (a premium feature) blamed on the API key's permissions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from lago_org_billing import (
    BillingSettings,
    LagoAPIError,
    LagoClient,
    LagoNotFoundError,
    LagoUnavailableError,
    LagoValidationError,
    OrgBilling,
)

pytestmark = pytest.mark.anyio


class _LoseAnswers(httpx.AsyncBaseTransport):
    """Lets Lago apply each request, then answers the first ``count`` that ``match`` with a 502 (a proxy timing out
    after Lago committed)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, match: Callable[[httpx.Request], bool], count: int = 1):
        self.inner = inner
        self.match = match
        self.left = count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response = await self.inner.handle_async_request(request)
        if self.left > 0 and self.match(request):
            self.left -= 1
            await response.aread()
            return httpx.Response(502, text="<html>502 Bad Gateway</html>", headers={"content-type": "text/html"})
        return response


def _settings(fake_lago: Any, **changes: Any) -> BillingSettings:
    values: dict[str, Any] = {"api_url": fake_lago.base_url, "api_key": fake_lago.api_key, "retry_backoff": 0.001}
    values.update(changes)
    return BillingSettings(**values)


@pytest.fixture
async def billing(fake_lago: Any, lago_client: LagoClient) -> AsyncIterator[OrgBilling]:
    fake_lago.add_billable_metric("api_call", aggregation_type="count_agg")
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_plan("pro", amount_cents=5000)
    async with OrgBilling(client=lago_client) as service:
        yield service


# ------------------------------------------------------------------------------------ re-runs and plan overrides


@pytest.mark.parametrize("discount", [500, 1500])
async def test_rerunning_subscribe_keeps_a_subscription_with_plan_overrides(
    fake_lago: Any, billing: OrgBilling, discount: int
) -> None:
    """An org set up with a negotiated price (plan_overrides), then the same setup run again (a deploy hook, an
    "ensure billing" job): Lago compares plan *ids*, the override plan is not the plan, so the re-run was an upgrade
    (cheaper override: the discounted subscription terminated, billed at once, the org on list price) or a scheduled
    downgrade (dearer override). The docstring promises "the same plan returns the existing subscription"."""
    first = await billing.subscribe_org_to_plan("org_1", "starter", "Acme", plan_overrides={"amount_cents": discount})
    again = await billing.subscribe_org_to_plan("org_1", "starter", "Acme")
    assert again["subscription"]["lago_id"] == first["subscription"]["lago_id"]
    assert again["subscription"].get("next_plan_code") is None
    assert [s["status"] for s in fake_lago.subscriptions] == ["active"]
    assert fake_lago.invoices == []
    direct = await billing.create_subscription("org_1", "starter")
    assert direct["lago_id"] == first["subscription"]["lago_id"]
    assert [s["status"] for s in fake_lago.subscriptions] == ["active"]


async def test_change_plan_to_the_plan_it_is_on_keeps_its_overrides(fake_lago: Any, billing: OrgBilling) -> None:
    """change_plan to the plan the org is on already (an admin screen saving the form unchanged) replaced an
    overridden subscription by the plain plan."""
    first = await billing.subscribe_org_to_plan("org_1", "starter", "Acme", plan_overrides={"amount_cents": 500})
    same = await billing.change_plan("org_1", "starter")
    assert same["lago_id"] == first["subscription"]["lago_id"]
    assert [s["status"] for s in fake_lago.subscriptions] == ["active"]
    upgraded = await billing.change_plan("org_1", "pro")  # a real change still goes through
    assert upgraded["plan_code"] == "pro"


async def test_the_same_plan_code_of_another_customers_subscription_is_not_the_orgs(
    fake_lago: Any, billing: OrgBilling
) -> None:
    """A subscription external_id taken by another customer (a legacy user's, named like the org) is not returned as
    the org's: Lago refuses the create."""
    fake_lago.add_customer("user_1", name="User")
    fake_lago.add_subscription("user_1", "starter", external_id="org_1")
    with pytest.raises(LagoValidationError):
        await billing.create_subscription("org_1", "starter")


# ------------------------------------------------------------------------------------------- terminate re-runs


async def test_terminate_whose_answer_is_lost_returns_the_terminated_subscription(fake_lago: Any) -> None:
    """DELETE is not retried by the client (a retry of a terminate Lago applied would 404). A terminate whose answer
    was lost after Lago applied it raised LagoUnavailableError "retry later", and the retry raised LagoNotFoundError
    "Check the id ..., or create the resource first" for a subscription that *is* terminated. The terminate reads
    back what Lago did; terminating it again says it is terminated already (still a 404 for billing_routes)."""
    fake_lago.add_plan("starter", amount_cents=1000)
    settings = _settings(fake_lago)
    lose = _LoseAnswers(fake_lago.transport(), lambda request: request.method == "DELETE")
    async with OrgBilling(settings, client=LagoClient(settings, transport=lose)) as billing:
        subscribed = await billing.subscribe_org_to_plan("org_1", "starter", "Acme")
        ended = await billing.terminate_subscription("org_1")
        assert ended["status"] == "terminated" and ended["lago_id"] == subscribed["subscription"]["lago_id"]
        assert [s["status"] for s in fake_lago.subscriptions] == ["terminated"]
        for again in (
            lambda: billing.terminate_subscription("org_1"),
            lambda: billing.terminate_subscription("org_1", "org_1"),
        ):
            with pytest.raises(LagoNotFoundError, match="already terminated") as info:
                await again()
            assert "create the resource first" not in str(info.value)
        with pytest.raises(LagoNotFoundError):  # an org never subscribed
            await billing.terminate_subscription("org_never")


async def test_a_pending_subscription_canceled_behind_a_lost_answer(fake_lago: Any) -> None:
    fake_lago.add_plan("starter", amount_cents=1000)
    settings = _settings(fake_lago)
    lose = _LoseAnswers(fake_lago.transport(), lambda request: request.url.params.get("status") == "pending")
    async with OrgBilling(settings, client=LagoClient(settings, transport=lose)) as billing:
        await billing.subscribe_org_to_plan("org_1", "starter", "Acme", subscription_at="2999-01-01T00:00:00Z")
        first = await billing.terminate_subscription("org_1")
        assert first["status"] == "canceled"
        with pytest.raises(LagoNotFoundError, match="already canceled"):
            await billing.terminate_subscription("org_1")


async def test_a_terminate_lago_did_not_apply_still_raises(fake_lago: Any) -> None:
    """Lago down: the read-back fails too, and the caller is told to retry (nothing was terminated)."""
    fake_lago.add_plan("starter", amount_cents=1000)
    settings = _settings(fake_lago)
    async with OrgBilling(settings, transport=fake_lago.transport()) as billing:
        await billing.subscribe_org_to_plan("org_1", "starter", "Acme")
        fake_lago.faults.inject(503, count=10**6)
        with pytest.raises(LagoUnavailableError, match="retry later"):
            await billing.terminate_subscription("org_1")
        fake_lago.faults.clear()
    assert [s["status"] for s in fake_lago.subscriptions] == ["active"]


async def test_terminating_a_terminated_subscription_of_another_org_is_refused(billing: OrgBilling) -> None:
    await billing.subscribe_org_to_plan("org_b", "starter", "B")
    await billing.terminate_subscription("org_b")
    with pytest.raises(LagoAPIError) as info:  # not answered as if org_a's subscription were terminated
        await billing.terminate_subscription("org_a", "org_b")
    assert "org_b" in str(info.value)


# ------------------------------------------------------------------------------------------ is_org_customer


async def test_is_org_customer_of_a_legacy_email_keyed_customer_is_false(fake_lago: Any, billing: OrgBilling) -> None:
    """The seed's backward-compatibility pattern, ``if is_org_customer(customer_id): ... else: needs migration``,
    with legacy customers keyed by the user's email: it raised InvalidIdentifierError. An id with a '.' can never be
    an org customer here (create_org_customer refuses it), so it is not one."""
    fake_lago.add_customer("alice@example.com", name="Alice")
    assert await billing.is_org_customer("alice@example.com") is False
    await billing.create_org_customer("org_1", "Acme")
    assert await billing.is_org_customer("org_1") is True


# ------------------------------------------------------------------------------------ a LAGO_API_URL gone wrong


async def test_a_lago_url_under_a_wrong_path_is_an_error_not_an_org_without_billing(fake_lago: Any) -> None:
    """LAGO_API_URL with a path Lago is not served under (https://host/lago): Lago answers every call with its
    catch-all ``404 resource_not_found``. get_customer and get_subscription answered None ("this org has no
    customer / subscription": a dashboard shows every org unbilled) and create_org_customer failed with "Check the
    id ..., or create the resource first" while creating it."""
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_customer("org_1", name="Acme")
    fake_lago.add_subscription("org_1", "starter", external_id="org_1")
    settings = _settings(fake_lago, api_url=fake_lago.base_url + "/lago")
    async with OrgBilling(settings, transport=fake_lago.transport()) as billing:
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: billing.get_customer("org_1"),
            lambda: billing.get_subscription("org_1"),
            lambda: billing.is_org_customer("org_1"),
            lambda: billing.get_or_create_customer("org_1", "Acme"),
            lambda: billing.create_org_customer("org_2", "Beta"),
            lambda: billing.terminate_subscription("org_1"),
        ]
        for call in calls:
            with pytest.raises(LagoAPIError, match="LAGO_API_URL") as info:
                await call()
            assert "create the resource first" not in str(info.value)
    assert [c["external_id"] for c in fake_lago.customers] == ["org_1"]


async def test_a_premium_only_feature_is_not_blamed_on_the_api_key(fake_lago: Any, lago_client: LagoClient) -> None:
    """Lago answers ``403 feature_unavailable`` for a premium feature its licence lacks (entitlements, progressive
    billing...): the error said "The API key lacks a permission", sending the operator to regenerate keys."""
    fake_lago.faults.inject(
        403, path="/api/v1/features", body={"status": 403, "error": "Forbidden", "code": "feature_unavailable"}
    )
    with pytest.raises(LagoAPIError) as info:
        await lago_client.list_features()
    message = str(info.value)
    assert "lacks a permission" not in message
    assert "premium" in message or "licen" in message


async def test_current_usage_of_a_customer_without_active_subscription_says_what_to_do(
    fake_lago: Any, lago_client: LagoClient
) -> None:
    """``405 no_active_subscription`` (current usage of a customer whose subscription ended or has not started) was
    "Lago answered ... with 405 Method Not Allowed (no_active_subscription)." with nothing to do."""
    fake_lago.add_customer("org_1", name="Acme")
    with pytest.raises(LagoAPIError, match="subscribe it first") as info:
        await lago_client.get_current_usage("org_1", "org_1")
    assert info.value.status == 405 and info.value.code == "no_active_subscription"
