"""What the per-key bounds of a long-running server do once many org ids reach them: the quota gate's in-process
records of an org whose usage Lago does not count (they are its only count), the warnings said once per org, and
the request log of an emulator served for good (``lago-org-billing emulator``, ``demo --serve``). Every figure is a
count (calls let through, warnings, records kept): no sleeps as synchronisation, no timing assertions. Each test
failed on the code before its fix.
"""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import anyio
import pytest

from _quota_app import Clock
from lago_org_billing import BillingSettings
from lago_org_billing._errors import LagoNotFoundError
from lago_org_billing._quota import QuotaConfig, QuotaGate

pytestmark = pytest.mark.anyio

PERIOD_START = "2026-03-01T00:00:00Z"
PERIOD_END = "2026-03-31T23:59:59Z"


class Lago:
    """A LagoClient stand-in (the two reads the gate makes). ``real`` orgs are subscribed with ``max_api_calls`` of
    ``limit``; any other id is Lago's 404. ``uncharged`` orgs are on a plan with no charge on ``api_call``: Lago
    counts none of their calls (the gate's own records are their count). While ``hold`` is set, every read waits for
    ``release`` (a slow or hung Lago)."""

    def __init__(self, real: tuple[str, ...] = (), *, uncharged: tuple[str, ...] = (), limit: int = 1000) -> None:
        self.real = set(real) | set(uncharged)
        self.uncharged = set(uncharged)
        self.limit = limit
        self.hold = False
        self.release = anyio.Event()
        self.log: list[tuple[str, str]] = []

    async def _read(self, kind: str, org: str) -> None:
        self.log.append((kind, org))
        if self.hold:
            await self.release.wait()

    async def get_subscription(self, external_id: str, *, status: str | None = None) -> dict[str, Any]:
        await self._read("sub", external_id)
        if external_id not in self.real:
            raise LagoNotFoundError("Not Found", status=404, code="not_found")
        return {
            "external_id": external_id,
            "external_customer_id": external_id,
            "status": "active",
            "plan_code": "starter",
            "current_billing_period_started_at": PERIOD_START,
            "current_billing_period_ending_at": PERIOD_END,
            "entitlements": [{"code": "api_quota", "privileges": [{"code": "max_api_calls", "value": self.limit}]}],
        }

    async def get_current_usage(self, customer: str, subscription: str, **params: Any) -> dict[str, Any]:
        await self._read("usage", subscription)
        metric = "storage" if subscription in self.uncharged else "api_call"
        return {
            "from_datetime": PERIOD_START,
            "to_datetime": PERIOD_END,
            "charges_usage": [
                {"billable_metric": {"code": metric, "aggregation_type": "sum_agg"}, "events_count": 0, "units": "0"}
            ],
        }


def gate_of(lago: Lago, clock: Clock, **config: Any) -> QuotaGate:
    settings = BillingSettings(api_url="http://lago.invalid", api_key="k")
    return QuotaGate(settings, lago, config=QuotaConfig(**config), clock=clock.time)  # type: ignore[arg-type]


async def settle_refreshes(gate: QuotaGate) -> None:
    while gate._refreshing:
        for event in list(gate._refreshing.values()):
            await event.wait()


# ------------------------------------------------------------------------------------ 1. LocalBackend LRU


@pytest.mark.parametrize("read_again", [False, True], ids=["records-recent", "records-folded-by-a-later-read"])
async def test_a_flood_of_org_ids_does_not_forget_the_calls_only_the_gate_counts(read_again: bool) -> None:
    """An org on a plan with no charge on the calls metric: Lago counts none of its calls, the gate's records are
    its count for the period (said at WARNING). LocalBackend over ``max_orgs`` forgot it like any org with no call
    in flight once it was among the least recently used: a flood of fresh ids let through while Lago was slow
    (fail-open: each counted) pushed it out, and its calls of the period were forgotten; back, it was let through
    its whole limit again (5 more after 4 made, on a limit of 5). Its records should outlive ids seen once."""
    clock = Clock()
    lago = Lago(uncharged=("solo",), limit=5)
    gate = gate_of(lago, clock, max_orgs=50, cold_timeout=0.0)
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        first = await gate.check("solo")  # cold: let through at once (cold_timeout 0), its snapshot read meanwhile
        assert first.allowed
        gate.settle("solo", first, tokens=0, billed=True)
        await settle_refreshes(gate)
        made = 1
        for _ in range(3):
            decision = await gate.check("solo")
            assert decision.allowed
            gate.settle("solo", decision, tokens=0, billed=True)
            made += 1
        clock.advance(120)  # the org idle from now on
        if read_again:  # its usage read again (its records kept, folded: Lago lacks them)
            await gate.invalidate("solo", refresh=True)
            await settle_refreshes(gate)
            assert gate.local._orgs["solo"].counts.c == {0: 4}
        lago.hold = True  # Lago slow from now on: fresh ids are let through (LAGO_FAIL_OPEN), each counted
        for i in range(200):
            decision = await gate.check(f"fake-{i}")
            gate.settle(f"fake-{i}", decision, tokens=0, billed=True)
        lago.release.set()
        lago.hold = False
        await settle_refreshes(gate)
        allowed = 0
        for _ in range(5):
            decision = await gate.check("solo")
            await settle_refreshes(gate)
            if decision.allowed:
                gate.settle("solo", decision, tokens=0, billed=True)
                allowed += 1
        tasks.cancel_scope.cancel()
    assert made + allowed == 5, f"{made} calls made, then {allowed} more let through on a limit of 5"


# ------------------------------------------------------------------------------ 2. a served emulator's log


def _batch(index: int) -> dict[str, Any]:
    return {
        "events": [
            {
                "transaction_id": f"tx-{index}-{n}",
                "external_subscription_id": "org_a",
                "code": "api_call",
                "timestamp": 1_770_000_000 + index,
                "properties": {"org_id": "org_a", "endpoint": "/v1/chat", "total_tokens": 7},
            }
            for n in range(100)
        ]
    }


async def test_the_emulator_command_keeps_no_request_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """``lago-org-billing emulator`` serves a FakeLago for good: its ``requests`` log (for tests that inspect it in
    process) was kept there too, where nothing can read it, each batch's events parsed again, and grew with every
    request for as long as it served (about 1 KB per event beside the events themselves: hundreds of MB under a load
    test). The served emulator keeps the events (Lago's state), not a log of its requests."""
    import uvicorn

    from lago_org_billing.testing import FakeLago
    from lago_org_billing.testing._server import run

    served: list[Any] = []

    def serve(self: Any) -> None:  # (uvicorn's loop, not run: the app it was given is driven below, in process)
        served.append(self.config.app)
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", serve)
    fake = FakeLago(api_key="k")
    fake.add_plan("starter", amount_cents=0)
    fake.add_subscription("org_a", "starter", external_id="org_a")
    run(fake, "127.0.0.1", 0)
    assert served == [fake]
    async with fake.client() as client:
        for index in range(50):
            assert (await client.post("/api/v1/events/batch", json=_batch(index))).status_code == 200
            assert (await client.get("/api/v1/subscriptions/org_a")).status_code == 200
    assert len(fake.events) == 5_000
    assert fake.requests == []


def test_the_served_demo_keeps_no_request_log() -> None:
    """``demo --serve`` serves its emulator until stopped: its request log grew with every request (the demo reads
    Lago's events, never that log)."""
    import httpx

    from lago_org_billing._demo import API_KEY, _serving, seed
    from lago_org_billing.testing import FakeLago

    fake = FakeLago(api_key=API_KEY)
    seed(fake)
    with _serving(fake) as (lago_url, _, _), httpx.Client(base_url=lago_url, trust_env=False) as client:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        for index in range(20):
            batch = _batch(index)
            for event in batch["events"]:
                event["external_subscription_id"] = "org_acme"
            answer = client.post("/api/v1/events/batch", json=batch, headers=headers)
            assert answer.status_code == 200, answer.text
    assert len(fake.events) == 2_000
    assert fake.requests == []


# --------------------------------------------------------------------------- 3. warnings said once per org


async def test_the_warning_said_once_per_org_is_not_said_again_past_ten_thousand_orgs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A warning about one org's configuration (its plan charges no calls, its token metric sums nothing...) is
    said once per org. Its memory was bounded at 10,000 entries, far below the orgs the gate keeps (``max_orgs``,
    100,000), and emptied when full: past 10,000 such orgs, every org was warned again at each of its usage reads
    (each ``LAGO_USAGE_CACHE_TTL``), tens of thousands of WARNING lines an hour. Observed: 10,500 orgs read twice,
    21,000 warnings. Expected: one per org."""
    clock = Clock()
    orgs = tuple(f"org-{i}" for i in range(10_500))
    lago = Lago(uncharged=orgs)
    gate = gate_of(lago, clock, max_concurrent_refreshes=64)
    caplog.set_level("WARNING", logger="lago_org_billing.quota")
    async with anyio.create_task_group() as tasks:
        await tasks.start(gate.run)
        for _ in range(2):  # each org's usage read twice (its snapshot dropped between: a webhook, as a TTL would)
            for index, org in enumerate(orgs):
                await gate.invalidate(org, refresh=True)
                if index % 500 == 499:
                    await settle_refreshes(gate)
            await settle_refreshes(gate)
        tasks.cancel_scope.cancel()
    assert len(lago.log) == 2 * 2 * len(orgs)  # (each read: the subscription, then the usage)
    said = [record for record in caplog.records if "has no charge on the metric" in record.getMessage()]
    assert len(said) == len(orgs)


# ------------------------------------------------------------------- 4. what a failed refresh leaves per org


async def test_the_refresh_errors_kept_per_org_do_not_hold_their_frames() -> None:
    """Why an org's last refresh failed is kept per org (``snapshot()`` raises it), up to ``max_orgs`` of them. Kept
    with its traceback, each held the frames of the failed call (the client's request, Lago's answer...): about 7 KB
    per org, some 700 MB for the default 100,000 orgs of an outage (or of a flood of org ids from a header while Lago
    is down). Measured with tracemalloc: what the kept errors hold stays about an error's size, and the error is
    still raised, saying what failed."""
    from lago_org_billing import LagoClient
    from lago_org_billing._errors import LagoUnavailableError
    from lago_org_billing.testing import FakeLago
    from lago_org_billing.testing._server import install_controls

    fake = install_controls(FakeLago(api_key="k"))
    fake.faults.inject(status=503)  # Lago down
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    orgs = 300
    tracemalloc.start()
    try:
        async with LagoClient(settings, transport=fake.transport()) as client:
            gate = QuotaGate(settings, client, config=QuotaConfig(cold_timeout=0.0, failure_backoff=0.0))
            async with anyio.create_task_group() as tasks:
                await tasks.start(gate.run)
                for index in range(orgs):
                    await gate.check(f"org-{index}")  # (let through at once: cold, LAGO_FAIL_OPEN)
                    await settle_refreshes(gate)
                    gate._paused_until = 0.0  # (each 503 pauses the reads: the next org is read at once all the same)
                assert len(gate._refresh_errors) == orgs
                fake.requests.clear()
                gc.collect()
                before = tracemalloc.get_traced_memory()[0]
                gate._refresh_errors.clear()
                gc.collect()
                freed = before - tracemalloc.get_traced_memory()[0]
                with pytest.raises(LagoUnavailableError, match="503"):  # (what snapshot() raises: said all the same)
                    await gate.snapshot("org-0")
                tasks.cancel_scope.cancel()
    finally:
        tracemalloc.stop()
    assert freed < orgs * 2_000, f"the errors kept held {freed // orgs} bytes per org"
