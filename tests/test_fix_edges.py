"""Edges of recent fixes: a donor contract ending today (migrate), a custom gate's token settles, Lago behind this
host's clock at the rollover."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lago_org_billing import BillingSettings, OrgBillingMiddleware, QuotaDecision
from lago_org_billing.testing import FakeLago
from test_migration_prices import migrate

API_KEY = "k"


# --- migrate: a donor's fixed term that ends today --------------------------------------------------------------------


class _Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_a_donor_contract_ending_today_fails_its_org_with_why_not_fix_the_fields(tmp_path: Path) -> None:
    """The migration now copies the donor's ``ending_at``. Lago refuses an ``ending_at`` that is not on a later day
    than today (``invalid_date``), so a contract ending today (or ended earlier today, before Lago's hourly job
    terminates it) made the org fail after its customer was written, with Lago's 422 telling the operator to "fix
    the fields its error details name", a field the operator never sent; the dry run said nothing. The dry run now
    warns, and the failure says whose end date it is and what to do."""
    clock = _Clock(datetime(2026, 6, 29, 12, 0, tzinfo=timezone.utc))
    fake = FakeLago(clock_jobs="boundary", api_key=API_KEY, clock=clock)
    fake.add_plan("pro", amount_cents=5_000)
    fake.add_customer("ursula")
    fake.add_subscription("ursula", "pro", external_id="sub_ursula", ending_at="2026-06-30T18:00:00Z")
    clock.now = datetime(2026, 6, 30, 9, 0, tzinfo=timezone.utc)  # the contract's last day

    # (the dry run reads this host's date: any day from 30 June 2026 on is "today or later")
    code, _, _, report = migrate(fake, tmp_path, "ursula,acme,Acme,\n")
    assert code == 0
    (warning,) = [w for w in report["orgs"][0]["warnings"] if "ending_at" in w]
    assert "sub_ursula" in warning and "2026-06-30" in warning

    code, out, _, report = migrate(fake, tmp_path, "ursula,acme,Acme,\n", "--execute")
    assert code == 1, out
    (error,) = report["orgs"][0]["errors"]
    assert "sub_ursula" in error and "2026-06-30" in error and "ending_at" in error
    assert "fix the fields" not in error
    assert [(s["external_id"], s["status"]) for s in fake.subscriptions] == [("sub_ursula", "active")]


# --- tokens settled in their period: the gate protocol ------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _TicketDecision(QuotaDecision):
    """A custom gate's decision carrying its own reservation (as QuotaGate's ``_Decision`` does)."""

    ticket: str = ""


class _TicketGate:
    """A custom gate (QuotaGateProtocol): reserves a ticket per request, releases it when not billed."""

    def __init__(self, decision: QuotaDecision) -> None:
        self.decision = decision
        self.settles: list[tuple[Any, int, bool]] = []

    async def run(self, *, task_status: Any = None) -> None:
        if task_status is not None:
            task_status.started()

    async def check(self, org_id: str) -> QuotaDecision:
        return self.decision

    def settle(self, org_id: str, decision: QuotaDecision, *, tokens: int, billed: bool) -> None:
        self.settles.append((decision, tokens, billed))

    async def aclose(self) -> None:
        pass


async def _chat(request: Request) -> Response:
    return JSONResponse({"model": "gpt-4o-mini", "usage": {"prompt_tokens": 5, "completion_tokens": 7}})


@pytest.fixture
def lago() -> Iterator[FakeLago]:
    fake = FakeLago(clock_jobs="boundary", api_key=API_KEY)
    fake.add_billable_metric("api_call", aggregation_type="count_agg")
    fake.add_plan("starter", amount_cents=0)
    fake.add_subscription("org_a", "starter", external_id="org_a")
    yield fake


async def _one_request(lago: FakeLago, gate: Any) -> OrgBillingMiddleware:
    settings = BillingSettings(api_url=lago.base_url, api_key=API_KEY, org_header="X-Org-Id", retry_backoff=0.001)
    app = Starlette(routes=[Route("/v1/chat", _chat, methods=["POST"])])
    middleware = OrgBillingMiddleware(app, settings, quota=gate, transport=lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            assert (await http.post("/v1/chat", headers={"X-Org-Id": "org_a"})).status_code == 200
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return middleware


@pytest.mark.anyio
async def test_a_custom_gate_gets_its_tokens_with_an_empty_decision_as_documented(lago: FakeLago) -> None:
    """QuotaGateProtocol.settle: the middleware calls it with the request's decision (tokens=0), then once the
    event is built "with an empty QuotaDecision() and billed=False". A custom gate whose decision carries its own
    reservation (a subclass, as QuotaGate's is) now gets that reservation a second time, as if not billed: a gate
    releasing on billed=False releases it twice."""
    gate = _TicketGate(_TicketDecision(reserved=True, ticket="t-1"))
    await _one_request(lago, gate)
    assert [(type(d), tokens, billed) for d, tokens, billed in gate.settles] == [
        (_TicketDecision, 0, True),
        (QuotaDecision, 12, False),
    ]


class _PlainDecision(QuotaDecision):
    """A subclass with an __init__ of its own (not a dataclass of its own): dataclasses.replace cannot rebuild it."""

    def __init__(self, ticket: str) -> None:
        super().__init__(reserved=True)
        self.ticket = ticket


@pytest.mark.anyio
async def test_a_custom_gate_decision_of_its_own_class_does_not_lose_the_event(lago: FakeLago) -> None:
    gate = _TicketGate(_PlainDecision("t-1"))
    middleware = await _one_request(lago, gate)
    assert len(lago.events) == 1, middleware.stats
    assert lago.events[0]["properties"]["total_tokens"] == 12


# --- quota: Lago behind this host's clock at the rollover, under traffic ---------------------------------------------


@pytest.mark.anyio
async def test_lago_behind_at_the_rollover_a_stale_period_read_does_not_end_the_give_up() -> None:
    """The fix backs off the re-reads of one waiting request. With traffic, the waits overlap: a re-read made for
    another waiting request stores the period that ended (Lago still in it), and that store cleared the org's give-up
    as if Lago answered again, so the next request waited the whole cold_timeout and read Lago again (20 requests/s
    for 3 s: 52 refreshes, one request in five delayed 0.5 s). Within failure_backoff, the next requests should
    answer the fail policy at once, as after a failed refresh."""
    import datetime as dt

    from _quota_app import Clock, seed
    from lago_org_billing import LagoClient
    from test_quota_periods import MARCH_END, LaggingLago, lago_reads, make_gate

    clock = Clock(MARCH_END - dt.timedelta(minutes=1))
    fake = seed(FakeLago(clock_jobs="boundary", api_key="k", clock=LaggingLago(clock, 5.0)), starter_calls=5)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = make_gate(lago, clock, cold_timeout=0.2)
        async with anyio.create_task_group() as tasks:
            await tasks.start(gate.run)
            assert (await gate.check("org_1")).allowed
            clock.at = MARCH_END + dt.timedelta(seconds=0.5)  # Lago: 23:59:55.5, still March
            assert (await gate.check("org_1")).allowed  # waited cold_timeout, then fail-open: the org given up
            # another request's wait, begun meanwhile, re-reads Lago (as _cold does): March again
            event = gate._schedule_refresh("org_1", gate.clock(), force=True, urgent=True)
            assert event is not None
            await event.wait()
            reads, waits = lago_reads(fake), gate.stats["cold_waits"]
            assert (await gate.check("org_1")).allowed  # the same instant by the gate's clock
            assert (gate.stats["cold_waits"] - waits, lago_reads(fake) - reads) == (0, 0)
            tasks.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_gate_given_to_two_middlewares_without_lifespan_closes() -> None:
    """Two apps served without a lifespan (their background started by their first request) sharing one quota gate
    (``quota=a.quota``): the second start ran the gate's background a second time, and closing ended only that
    run, so ``a.aclose()`` waited for ever. The gate now runs once; the second run only waits for ``aclose``."""

    async def chat(request: Request) -> Response:
        return JSONResponse({"usage": {"total_tokens": 3}})

    fake = FakeLago()
    fake.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake.add_plan("starter", amount_cents=1000)
    fake.add_subscription("org_a", "starter", external_id="org_a")
    settings = BillingSettings(api_url=fake.base_url, api_key=fake.api_key, org_header="X-Org-Id")
    a = OrgBillingMiddleware(Starlette(routes=[Route("/c", chat)]), settings=settings, transport=fake.transport())
    b = OrgBillingMiddleware(
        Starlette(routes=[Route("/c", chat)]), settings=settings, transport=fake.transport(), quota=a.quota
    )
    for middleware in (a, b):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            assert (await client.get("/c", headers={"X-Org-Id": "org_a"})).status_code == 200
    with anyio.fail_after(10):  # (a guard against the hang, not a timing assertion)
        await a.aclose()
        await b.aclose()
    assert len(fake.events) == 2
