"""The transition a real user goes through, from user-keyed Lago customers (the seed's in-house integration) to
org-keyed billing, while traffic flows: the middleware deployed before ``migrate --execute`` (events of orgs whose
subscription does not exist yet), the org's quota right after the cut-over, a second run with a changed mapping (a
user moved to another org) and the seed's helpers on a half-migrated account. Everything through the emulator."""

from __future__ import annotations

import time
import types
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from _quota_app import Clock, chat, seed
from lago_org_billing import (
    BillingSettings,
    LagoClient,
    OrgBilling,
    OrgBillingMiddleware,
    _middleware as middleware_module,
)
from lago_org_billing._migration import MappingError, OrgMapping, build_mapping, run_migration
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "k"
HEADERS = {"X-Org-Id": "acme", "X-User-Id": "alice"}


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """One clock for the emulator, the gate and the middleware's event timestamps."""
    clock = Clock()
    monkeypatch.setattr(middleware_module, "time", types.SimpleNamespace(time=clock.time, monotonic=time.monotonic))
    return clock


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """Plans with entitlements (starter: 5 calls); alice and bob on user-keyed starter subscriptions; org acme
    (theirs) not migrated yet; org_1 is another, org-keyed, customer of the seed."""
    fake = seed(FakeLago(api_key=API_KEY, clock=clock.now), starter_calls=5)
    for user in ("alice", "bob"):
        fake.add_customer(user)
        fake.add_subscription(user, "starter", external_id=f"sub_{user}")
    return fake


@pytest.fixture
async def lago(fake: FakeLago) -> AsyncIterator[LagoClient]:
    settings = BillingSettings(
        api_url=fake.base_url,
        api_key=API_KEY,
        org_header="X-Org-Id",
        user_header="X-User-Id",
        retry_backoff=0.001,
    )
    async with LagoClient(settings, transport=fake.transport()) as client:
        yield client


ACME = OrgMapping(org_id="acme", org_name="Acme", email=None, users=("alice", "bob"))


def app() -> Starlette:
    return Starlette(routes=[Route("/chat", chat, methods=["POST"])])


def api_call_events(usage: dict[str, Any]) -> int:
    return sum(int(c["events_count"]) for c in usage["charges_usage"] if c["billable_metric"]["code"] == "api_call")


# -- the middleware deployed before migrate --execute ------------------------------------------------------------


async def test_the_middleware_before_the_migration_blocks_every_org_not_migrated_by_default(
    lago: LagoClient, clock: Clock
) -> None:
    """Deployed with the defaults before ``migrate --execute``, every org not migrated yet is answered 402 (its
    subscription does not exist yet): an outage until the migration has run, whatever its users' plans. What this
    pins: the order a user must follow (migrate first), which the README does not spell out."""
    gate = QuotaGate(lago.settings, lago, config=QuotaConfig(), clock=clock.time)
    middleware = OrgBillingMiddleware(app(), lago.settings, quota=gate, client=lago)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            response = await client.post("/chat", headers=HEADERS)
    finally:
        await middleware.aclose()
    assert response.status_code == 402
    assert "no active Lago subscription" in response.json()["detail"]


async def test_events_of_an_org_not_migrated_yet_are_taken_by_lago_and_never_billed(
    fake: FakeLago, lago: LagoClient, clock: Clock
) -> None:
    """With ``LAGO_QUOTA_NO_SUBSCRIPTION=allow`` the requests are served and their events sent for a subscription
    that does not exist yet: Lago answers 200 (it stores events of unknown subscriptions), so the pipeline counts
    them delivered, no dead letter is kept (``dead-letters --replay`` has nothing to send), and once the migration
    has made the subscription they stay unbilled (timestamped before its ``started_at``). Only the requests after
    the cut-over are billed. (The README's "a subscription created late" among the causes a replay fixes is wrong.)"""
    gate = QuotaGate(lago.settings, lago, config=QuotaConfig(no_subscription="allow"), clock=clock.time)
    middleware = OrgBillingMiddleware(app(), lago.settings, quota=gate, client=lago)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            assert (await client.post("/chat", headers=HEADERS)).status_code == 200
            assert await middleware.pipeline.flush(5)
            assert middleware.pipeline.stats["delivered"] == 1
            assert middleware.pipeline.stats["dead_lettered"] == 0
            assert [e["external_subscription_id"] for e in fake.events] == ["acme"]

            clock.advance(60)
            run = await run_migration(lago, [ACME], mode="execute")
            assert run.ok
            assert await middleware.pipeline.replay_dead_letters() == 0
            clock.advance(60)
            await gate.invalidate("acme")  # (what subscription.started does)
            assert (await client.post("/chat", headers=HEADERS)).status_code == 200
            assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    usage = await lago.get_current_usage("acme", "acme")
    assert api_call_events(usage) == 1  # the request after the cut-over only


# -- usage already counted this period ---------------------------------------------------------------------------


async def test_the_org_s_quota_starts_afresh_at_the_cut_over(fake: FakeLago, lago: LagoClient, clock: Clock) -> None:
    """alice used 4 of her 5 starter calls this period on her user-keyed subscription; right after the migration,
    org acme (on starter: 5 calls) is allowed 5 more: the users' usage of the period was billed on their
    subscriptions' termination invoices and is not counted against the org's limit. What this pins: every org gets
    a fresh allowance mid-period, which the README does not say."""
    await lago.create_events(
        [
            {
                "transaction_id": f"old_{n}",
                "external_subscription_id": "sub_alice",
                "code": "api_call",
                "timestamp": clock.time(),
                "properties": {"total_tokens": 10},
            }
            for n in range(4)
        ]
    )
    clock.advance(60)
    assert (await run_migration(lago, [ACME], mode="execute")).ok
    clock.advance(60)
    gate = QuotaGate(lago.settings, lago, config=QuotaConfig(), clock=clock.time)
    try:
        decisions = [await gate.check("acme") for _ in range(6)]
    finally:
        await gate.aclose()
    assert [d.allowed for d in decisions] == [True] * 5 + [False]


# -- a second run with a changed mapping -------------------------------------------------------------------------


@pytest.fixture
async def migrated(fake: FakeLago, lago: LagoClient) -> FakeLago:
    """acme (alice on pro, bob on starter) and globex (carol on starter) migrated: acme took alice's pro."""
    fake.add_customer("carol")
    fake.add_subscription("carol", "starter", external_id="sub_carol")
    fake.subscriptions[:] = [s for s in fake.subscriptions if s["external_id"] != "sub_alice"]
    fake.add_subscription("alice", "pro", external_id="sub_alice")
    first = [ACME, OrgMapping("globex", "Globex", None, ("carol",))]
    run = await run_migration(lago, first, mode="execute")
    assert run.ok and [o.plan_code for o in run.orgs] == ["pro", "starter"]
    return fake


async def test_a_user_moved_to_another_org_by_a_changed_mapping_is_said(migrated: FakeLago, lago: LagoClient) -> None:
    """The mapping fixed after a first run: alice belongs to globex. Her subscription was ended by the first run and
    acme kept the plan it took from her (pro); the second run used to re-mark her for globex without a word
    (dry run, execute and verify all clean): acme kept paying her plan, globex stayed on starter. It now says so."""
    changed = [
        OrgMapping("acme", "Acme", None, ("bob",)),
        OrgMapping("globex", "Globex", None, ("carol", "alice")),
    ]
    for mode in ("dry-run", "execute"):
        run = await run_migration(lago, changed, mode=mode)  # type: ignore[arg-type]
        globex = run.orgs[1]
        text = "\n".join(globex.warnings)
        assert "'alice'" in text and "'acme'" in text, (mode, globex.warnings)
        assert "earlier" in text and "change_plan" in text
    marks = {
        m["key"]: m["value"] for m in next(c for c in migrated.customers if c["external_id"] == "alice")["metadata"]
    }
    assert marks["migrated_to_org"] == "globex"  # (still moved: the mapping says so)


async def test_an_org_of_users_migrated_elsewhere_is_told_why_it_gets_no_plan(
    migrated: FakeLago, lago: LagoClient
) -> None:
    """bob, migrated to acme, is mapped alone to a new org: its subscription was ended by the first run, so newco gets
    no plan. The warning used to say only "no user has an active subscription", as if bob had never had one."""
    run = await run_migration(lago, [OrgMapping("newco", "NewCo", None, ("bob",))], mode="dry-run")
    text = "\n".join(run.orgs[0].warnings)
    assert "no user has an active subscription" in text
    assert "'bob'" in text and "migrated to org 'acme'" in text


class RefuseSubscribing(httpx.AsyncBaseTransport):
    """Lago refusing ``POST /subscriptions`` (a 422), everything else passed on."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/api/v1/subscriptions":
            return httpx.Response(422, json={"status": 422, "error": "Unprocessable Entity", "code": "x"})
        return await self.inner.handle_async_request(request)


# -- the seed's helpers on a half-migrated account ---------------------------------------------------------------


async def test_the_seed_s_helpers_on_an_org_whose_run_stopped_before_its_subscription(
    fake: FakeLago, lago: LagoClient, clock: Clock
) -> None:
    """A run stopped after the org customer was made, before its subscription (Lago refusing POST /subscriptions):
    is_org_customer says org for acme and legacy for its users, get_subscription and the gate's
    check_org_has_active_subscription say no subscription (the users' still bill them), --verify lists what is
    missing, and a second run finishes."""
    async with LagoClient(lago.settings, transport=RefuseSubscribing(fake.transport())) as refused:
        run = await run_migration(refused, [ACME], mode="execute")
    assert run.orgs[0].status == "failed"
    billing = OrgBilling(client=lago)
    assert await billing.is_org_customer("acme") is True
    assert await billing.is_org_customer("alice") is False
    assert await billing.get_subscription("acme") is None
    gate = QuotaGate(lago.settings, lago, config=QuotaConfig(), clock=clock.time)
    try:
        assert await gate.check_org_has_active_subscription("acme") is False
    finally:
        await gate.aclose()
    verify = await run_migration(lago, [ACME], mode="verify")
    assert verify.orgs[0].errors == [
        "org 'acme' has no active subscription 'acme'",
        "user 'alice' (org 'acme') still has active subscription(s) sub_alice",
        "user 'bob' (org 'acme') still has active subscription(s) sub_bob",
    ]
    assert (await run_migration(lago, [ACME], mode="execute")).ok
    assert (await run_migration(lago, [ACME], mode="verify")).ok
    assert (await billing.get_subscription("acme") or {}).get("plan_code") == "starter"


def test_a_user_in_two_orgs_is_refused_before_anything_is_written() -> None:
    """A user listed under two orgs is refused up front, naming both rows (the message does not name the two orgs:
    see the report)."""
    records = [
        ("map.csv line 2", {"user_id": "alice", "org_id": "acme", "org_name": "Acme", "email": ""}),
        ("map.csv line 3", {"user_id": "alice", "org_id": "globex", "org_name": "Globex", "email": ""}),
    ]
    with pytest.raises(MappingError) as caught:
        build_mapping(records, BillingSettings(api_key=API_KEY))
    assert caught.value.problems == ["map.csv line 3: duplicate user_id 'alice' (already in map.csv line 2)"]
