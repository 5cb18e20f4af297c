"""Seeded random sequences against the quota gate, checked against a model of the org's billing period.

Each seed drives one org through the real gate (:class:`QuotaGate`, in process, or two gates sharing a real
redis-server: two workers) and the Lago emulator on one settable clock: checks (one by one and concurrent) followed by
settles (billed with tokens, or released) whose events reach the emulator within ``settle_lag`` (as the delivery
pipeline does: dated at the check), usage other deployments send (events ingested in the emulator), plan upgrades,
pending downgrades and entitlement overrides (the emulator's webhooks then invalidate the gate, as ``LagoWebhooks``
does), usage webhooks (``alert.triggered``...), clock steps within a TTL, past it and across the billing period's end
(and past Lago's biller run, which switches a pending downgrade), Lago's reads failing (``fail_open`` on and off).

The oracle is a model of the period: the calls this deployment was allowed (in flight or billed, dated at their check)
and the events other deployments sent, with the emulator's own count checked against it at every step. Invariants, where
the gate's documented guarantees apply (see :mod:`lago_org_billing._quota`):

* **never over the limit**: an allowed call (on a snapshot) makes this deployment's calls of the period, plus the other
  deployments' calls Lago had when the deciding snapshot was requested, at most the limit; a token limit is checked on
  the tokens known at the check (the tokens of calls in flight are known only at their end: the documented overshoot).
  Calls allowed without a snapshot (``LAGO_FAIL_OPEN``) only while Lago fails, or within ``failure_backoff`` after;
  a 503 likewise, with ``fail_open`` off;
* **never refused below the limit**: a 429 holds on the period's true count, or is an *unsure* block ("may be lower":
  the records of the ``settle_lag`` seconds before the read, which Lago may have counted already) whose over-count is
  at most those records and whose ``Retry-After`` is short. Once everything is settled, delivered and ``settle_lag``
  old (the "exact knowledge" probe), no refusal below the limit at all (an unsure block reads Lago again first);
* **nothing left in flight and tokens counted right**: at the probe, the gate's usage after a fresh read is exactly the
  period's calls and tokens, and no call is in flight in its counters.

Allowed as documented: a snapshot that ``invalidate_all()`` (``plan.updated``) marked serves on its old plan until its
refresh; a 429 on it when Lago was not read in time asks back within ``failure_backoff``.

A failing seed prints its sequence; replay it by its test id (``test_random_sequences_in_process[3]``). A defect a
seed found is kept below as a named case, its seed in its docstring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal

import anyio
import anyio.lowlevel
import pytest

from _quota_app import BIG, SMALL, Clock, needs_redis, small_and_big_lago
from lago_org_billing import BillingSettings, LagoClient, _quota
from lago_org_billing._gate import QuotaDecision
from lago_org_billing._middleware import _tokens_only
from lago_org_billing._quota import USAGE_WEBHOOK_TYPES, QuotaConfig, QuotaGate
from lago_org_billing._snapshots import Snapshot
from lago_org_billing._webhooks import INVALIDATING_TYPES, ORG_WIDE_TYPES
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

UTC = dt.timezone.utc
ORG = "org_1"
LAG = 5.0  # QuotaConfig.settle_lag
TTL = 30.0  # LAGO_USAGE_CACHE_TTL
BACKOFF = 5.0  # QuotaConfig.failure_backoff
#: Lago's reads (subscription, entitlements, current usage): what an outage fails; events always get through (the
#: guarantees hold "as long as events reach Lago within settle_lag")
READ_PATHS = ("/api/v1/subscriptions", "/api/v1/customers")
SHOWN = 80  # steps of a failing sequence shown
STEPS = 300  # per seed (a probe every 40)


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclasses.dataclass
class Call:
    """One call this deployment was allowed: checked at ``checked`` (its event's timestamp) on gate ``gate``."""

    n: int
    gate: int
    checked: float
    decision: QuotaDecision
    blind: bool
    state: str = "flight"  # flight, billed, released
    tokens: int = 0
    settled: float = 0.0
    delivered: bool = False
    counted: bool = True  # (its tokens settled in the gate: with the call, or when its event was built)


@dataclasses.dataclass
class External:
    """Calls of another deployment: an event ingested in Lago at ``at``."""

    at: float
    tokens: int


class Violation(AssertionError):
    pass


class World:
    """The emulator, the gate(s), the clock, and the model of the org's period."""

    def __init__(self, rng: random.Random, fake: FakeLago, clock: Clock, gates: list[QuotaGate], fail_open: bool):
        self.rng = rng
        self.fake = fake
        self.clock = clock
        self.gates = gates
        self.fail_open = fail_open
        self.calls: list[Call] = []
        self.externals: list[External] = []
        self.down = False
        self.healthy_from = -math.inf  # (the gate's clock) when the last outage ended
        self.webhooks_seen = len(fake.emitted_webhooks)  # (the seeding's: sent before any gate ran)
        self.log: list[str] = []
        self.counter = 0
        self.start = clock.time()

    # ------------------------------------------------------------------------------------------ truth

    def now(self) -> float:
        return self.clock.time()

    def say(self, text: str) -> None:
        self.log.append(f"{self.now() - self.start:10.3f} {text}")

    def fail(self, text: str) -> None:
        raise Violation(
            f"{text}\nsequence (seconds since its start), the last {SHOWN} steps:\n" + "\n".join(self.log[-SHOWN:])
        )

    def lago(self) -> tuple[float, float, int, int]:
        """The org's current period as Lago reports it, and the calls and tokens Lago counted in it."""
        usage = self.fake.usage(ORG, ORG, billable_metric_code="api_call")["customer_usage"]
        charge = usage["charges_usage"][0]
        start = _ts(usage["from_datetime"])
        # (Lago counts from a subscription's exact start, which its answers give to the second: the calls of an
        # upgrade's second made before it are the old subscription's)
        for sub in self.fake.store.subscriptions:
            exact = sub.get("_started_exact")
            if sub["external_id"] == ORG and sub["status"] == "active" and exact and int(_ts(exact)) == int(start):
                start = max(start, _ts(exact))
        return (
            start,
            _ts(usage["to_datetime"]) + 1,
            int(charge["events_count"]),
            int(Decimal(charge["units"])),
        )

    def limits(self) -> tuple[int | None, int | None]:
        subscription = self.fake.store.get_subscription(ORG, None)["subscription"]
        values: dict[str, int | None] = {"max_api_calls": None, "max_tokens": None}
        for entitlement in subscription.get("entitlements") or ():
            if entitlement["code"] == "api_quota":
                for privilege in entitlement["privileges"]:
                    values[privilege["code"]] = privilege["value"]
        return values["max_api_calls"], values["max_tokens"]

    def period(self) -> tuple[float, float]:
        """Lago's current period, its count checked against the model's (the model is the oracle: it must agree)."""
        start, end, calls, tokens = self.lago()
        own = [c for c in self.calls if c.delivered and start <= c.checked < end]
        others = [e for e in self.externals if start <= e.at < end]
        if (calls, tokens) != (len(own) + len(others), sum(c.tokens for c in own) + sum(e.tokens for e in others)):
            self.fail(f"model out of step with Lago: Lago {calls} calls {tokens} tokens, model {own} {others}")
        return start, end

    def own(self, start: float, end: float) -> list[Call]:
        return [c for c in self.calls if c.state != "released" and start <= c.checked < end]

    def others(self, start: float, end: float, before: float = math.inf) -> list[External]:
        return [e for e in self.externals if start <= e.at < end and e.at < before]

    def unhealthy(self) -> bool:
        """Lago fails, or failed less than ``failure_backoff`` ago (the gate waits that long before asking again)."""
        return self.down or self.now() <= self.healthy_from + BACKOFF + 0.001

    # ------------------------------------------------------------------------------------------ the gate

    def snapshot_of(self, gate: QuotaGate) -> Snapshot | None:
        """The snapshot the gate decided on just now (read before any other task ran)."""
        if gate.backend is gate.local:
            return gate.local.peek_snapshot(ORG)
        return gate._known.get(ORG)

    async def check(self, index: int | None = None, *, strict: bool = False) -> Call | None:
        gate_index = self.rng.randrange(len(self.gates)) if index is None else index
        gate = self.gates[gate_index]
        decision = await gate.check(ORG)
        return self.judge(gate_index, gate, decision, strict=strict)

    def judge(
        self, index: int, gate: QuotaGate, decision: QuotaDecision, *, strict: bool, snap: Snapshot | None = None
    ) -> Call | None:
        """Check one decision against the model: right after it was made (no other task ran since), or, for the
        decisions of a burst, once all of them were made, with the snapshot each was made on (Redis decides them in
        an order their tasks do not resume in: the allowed calls of the burst are all counted first)."""
        now = self.now()
        if snap is None:
            snap = self.snapshot_of(gate)
        start, end = self.period()
        calls_limit, tokens_limit = self.limits()
        replanned = snap is not None and not snap.plan_fetched_at
        if decision.allowed:
            blind = decision.headers == ()
            if replanned:  # (marked by invalidate_all, plan.updated: it serves until its refresh, as documented)
                assert snap is not None
                calls_limit, tokens_limit = snap.calls_limit, snap.tokens_limit
            call = Call(self.counter, index, now, decision, blind)
            self.counter += 1
            self.calls.append(call)
            if blind:
                self.say(f"check g{index}: allowed blind (#{call.n})")
                if not (self.fail_open and self.unhealthy()):
                    self.fail(f"#{call.n} allowed without a snapshot while Lago answers (fail_open={self.fail_open})")
                return call
            assert snap is not None
            mine = self.own(start, end)
            seen = self.others(start, end, before=snap.requested_at)
            known_tokens = sum(c.tokens for c in mine if c.counted) + sum(e.tokens for e in seen)
            self.say(
                f"check g{index}: allowed #{call.n} (own {len(mine)} + others seen {len(seen)} of {calls_limit}; "
                f"tokens {known_tokens} of {tokens_limit})"
            )
            if calls_limit is not None and len(mine) + len(seen) > calls_limit:
                self.fail(
                    f"#{call.n} allowed over the limit: {len(mine)} calls of this deployment in the period and "
                    f"{len(seen)} of others Lago had at the read, limit {calls_limit}"
                )
            if tokens_limit is not None and known_tokens >= tokens_limit:
                self.fail(f"#{call.n} allowed with {known_tokens} tokens known of {tokens_limit}")
            return call
        if decision.status == 503:
            self.say(f"check g{index}: 503")
            if self.fail_open or not self.unhealthy():
                self.fail(f"503 while Lago answers (fail_open={self.fail_open})")
            return None
        problem = decision.problem or {}
        if decision.status != 429:
            self.fail(f"unexpected refusal {decision.status} {problem}")
        mine = self.own(math.floor(start), end)  # (records are kept by the second: the upgrade's own included)
        others = self.others(start, end)
        true_calls = len(mine) + len(others)
        true_tokens = sum(c.tokens for c in mine if c.state == "billed") + sum(e.tokens for e in others)
        # (refused rightly when either limit is reached, whichever the answer names: the calls limit is named first)
        below = (calls_limit is None or true_calls + 1 <= calls_limit) and (
            tokens_limit is None or true_tokens < tokens_limit
        )
        if problem.get("limit_name") == "max_api_calls":
            over_count = int(problem["usage"]) - true_calls
            unsure = snap.unsure_calls if snap is not None else 0
        else:
            over_count = int(problem["usage"]) - true_tokens
            unsure = snap.unsure_tokens if snap is not None else 0
        headers = {name.decode(): value.decode() for name, value in decision.headers}
        self.say(
            f"check g{index}: 429 {problem.get('limit_name')} usage {problem.get('usage')} (true {true_calls} calls, "
            f"{true_tokens} tokens; limits {calls_limit}/{tokens_limit}) retry {headers.get('retry-after')}"
            + (" unsure" if "may be lower" in str(problem.get("detail")) else "")
        )
        if below and replanned and int(headers["retry-after"]) <= BACKOFF:
            self.say("  (refused on a plan to be read again, Lago not read in time: asked back soon, as documented)")
            return None
        if below:
            if strict:
                self.fail(f"refused below the limit with exact knowledge: {problem}")
            if "may be lower" not in str(problem.get("detail")):
                self.fail(f"refused below the limit, not as an unsure block: {problem}")
            if over_count > unsure:
                self.fail(f"over-counted by {over_count}, more than the {unsure} unsure records of the snapshot")
            if int(headers["retry-after"]) > max(LAG + 1, BACKOFF):
                self.fail(f"an unsure block asked back in {headers['retry-after']} s")
        return None

    async def settle(self, call: Call, *, billed: bool, tokens: int) -> None:
        """The call's end: billed with its tokens (as ``QuotaGate.settle`` documents it), or, as the middleware does,
        billed now and its tokens settled when its event is built (:meth:`deliver`); or released."""
        gate = self.gates[call.gate]
        call.counted = not (billed and tokens and self.rng.random() < 0.5)
        gate.settle(ORG, call.decision, tokens=tokens if call.counted else 0, billed=billed)
        call.state = "billed" if billed else "released"
        call.tokens = tokens if billed else 0
        call.settled = self.now()
        self.say(
            f"settle #{call.n} g{call.gate}: "
            + (f"billed, {tokens} tokens{'' if call.counted else ' when built'}" if billed else "released")
        )
        await self.flush(gate)

    async def flush(self, gate: QuotaGate) -> None:
        flush = getattr(gate.backend, "flush", None)
        if flush is not None:
            await flush()

    async def deliver(self, call: Call) -> None:
        """The call's event reaches Lago (as the delivery pipeline sends it: dated at the check), its tokens settled
        in the gate as it is built (the middleware's way) when they were not with the call."""
        if not call.counted:
            gate = self.gates[call.gate]
            built = _tokens_only(getattr(call.decision, "period", ""), int(call.checked))  # (dated at its check)
            gate.settle(ORG, built, tokens=call.tokens, billed=False)
            call.counted = True
            await self.flush(gate)
        self.fake.store.create_event(
            {
                "event": {
                    "transaction_id": f"own-{call.n}",
                    "external_subscription_id": ORG,
                    "code": "api_call",
                    "timestamp": repr(call.checked),
                    "properties": {"total_tokens": call.tokens},
                }
            }
        )
        call.delivered = True
        self.say(f"deliver #{call.n}")

    def undelivered(self) -> list[Call]:
        return [c for c in self.calls if c.state == "billed" and not c.delivered]

    def in_flight(self) -> list[Call]:
        return [c for c in self.calls if c.state == "flight"]

    def external(self, count: int) -> None:
        for _ in range(count):
            tokens = self.rng.randrange(0, 40)
            self.counter += 1
            self.fake.store.create_event(
                {
                    "event": {
                        "transaction_id": f"other-{self.counter}",
                        "external_subscription_id": ORG,
                        "code": "api_call",
                        "timestamp": repr(self.now()),
                        "properties": {"total_tokens": tokens},
                    }
                }
            )
            self.externals.append(External(self.now(), tokens))
        self.say(f"others: {count} calls ingested")

    async def advance(self, seconds: float) -> None:
        """Step the clock (the gate's and the emulator's): the events due by then reach Lago first."""
        until = self.now() + seconds
        for call in self.in_flight():  # (a call in flight an hour is forgotten, its worker taken as dead: none is)
            if until - call.checked > 3000:
                await self.settle(call, billed=True, tokens=self.rng.randrange(0, 40))
        for call in self.undelivered():
            if call.settled + LAG <= until:
                await self.deliver(call)
        self.clock.advance(seconds)
        self.say(f"clock +{seconds:.3f}")
        await self.webhooks()

    async def webhooks(self) -> None:
        """The emulator's webhooks (its clock jobs ran at the last request) reach the app: LagoWebhooks invalidates."""
        self.fake.usage(ORG, ORG)  # (Lago's clock jobs: a pending downgrade switched at the biller's run)
        emitted = self.fake.emitted_webhooks
        while self.webhooks_seen < len(emitted):
            kind = emitted[self.webhooks_seen]["webhook_type"]
            self.webhooks_seen += 1
            if kind in INVALIDATING_TYPES or kind.startswith("subscription."):
                self.say(f"webhook {kind}")
                await self.rng.choice(self.gates).invalidate(ORG, webhook_type=kind)
            elif kind in ORG_WIDE_TYPES:  # (every org's plan read again: on each worker without Redis)
                self.say(f"webhook {kind}")
                for gate in self.gates if self.gates[0].backend is self.gates[0].local else self.gates[:1]:
                    await gate.invalidate_all()

    async def settled(self) -> None:
        """Every refresh in flight has ended."""
        for gate in self.gates:
            while gate._refreshing:
                for event in list(gate._refreshing.values()):
                    await event.wait()

    def outage(self, down: bool, status: int = 503) -> None:
        if down == self.down:
            return
        self.down = down
        if down:
            for path in READ_PATHS:
                self.fake.faults.inject(status, path=path)
        else:
            self.fake.faults.clear()
            self.healthy_from = self.now()
        self.say(f"Lago's reads fail ({status})" if down else "Lago answers again")

    def plan(self) -> str:
        return str(self.fake.store.get_subscription(ORG, None)["subscription"]["plan_code"])

    # ------------------------------------------------------------------------------------------ the probe

    async def probe(self) -> None:
        """Everything settled, delivered and ``settle_lag`` old, Lago answering: a check is refused only at the limit,
        and the gate's usage (after a fresh read) is the period's, exactly, with nothing in flight."""
        for call in self.in_flight():
            await self.settle(call, billed=True, tokens=self.rng.randrange(0, 40))
        for call in self.undelivered():
            await self.deliver(call)
        self.outage(False)
        await self.settled()  # (one failing now holds the fleet's lock failure_backoff more: stepped over next)
        await self.advance(max(LAG, BACKOFF) + 2)
        probed = await self.check(strict=True)
        if probed is not None:
            await self.settle(probed, billed=False, tokens=0)
        await self.settled()
        gate = self.rng.choice(self.gates)
        if self.rng.random() < 0.5:
            self.say("probe: invalidate")
            await gate.invalidate(ORG)
        else:
            self.say("probe: usage webhook")
            await gate.invalidate(ORG, webhook_type="alert.triggered")
            await gate.enforce_usage_limits(ORG)  # (due: refreshed in the background)
            await self.settled()
        start, end = self.period()
        mine = self.own(start, end)
        others = self.others(start, end)
        calls = len(mine) + len(others)
        tokens = sum(c.tokens for c in mine) + sum(e.tokens for e in others)
        for each in self.gates:
            usage = (await each.enforce_usage_limits(ORG))["usage"]
            self.say(f"probe: usage {usage}, true {calls} calls {tokens} tokens")
            if usage != {"max_api_calls": calls, "max_tokens": tokens}:
                self.fail(f"usage {usage} once everything settled, the period's is {calls} calls, {tokens} tokens")
        for each in self.gates:
            if each.backend is each.local:
                state = each.local._orgs.get(ORG)
                if state is not None and state.counts.i:
                    self.fail(f"calls left in flight once every call settled: {state.counts.i}")


# ------------------------------------------------------------------------------------------------ set-up


@contextlib.asynccontextmanager
async def world(
    seed: int,
    *,
    start: dt.datetime,
    fail_open: bool,
    redis_url: str | None = None,
    workers: int = 1,
) -> AsyncIterator[World]:
    """The gates (``workers`` of them, sharing ``redis_url`` when given) running on the emulator and one clock."""
    clock = Clock(start)
    fake = small_and_big_lago(clock, ORG)
    settings = BillingSettings(
        api_url=fake.base_url,
        api_key="k",
        max_retries=0,
        fail_open=fail_open,
        usage_cache_ttl=TTL,
        redis_url=redis_url,
    )
    prefix = f"random:{seed}:{uuid.uuid4().hex[:8]}:" if redis_url else QuotaConfig.redis_prefix
    # (cold_timeout short: a cold read of the emulator takes milliseconds, and waits for a read nobody makes end soon)
    config = QuotaConfig(jitter=0.0, settle_lag=LAG, failure_backoff=BACKOFF, cold_timeout=0.5, redis_prefix=prefix)
    async with LagoClient(settings, transport=fake.transport()) as client:
        gates = [QuotaGate(settings, client, config=config, clock=clock.time) for _ in range(workers)]
        try:
            async with anyio.create_task_group() as tasks:
                for gate in gates:
                    await tasks.start(gate.run)
                yield World(random.Random(seed), fake, clock, gates, fail_open)
                tasks.cancel_scope.cancel()
        finally:
            for gate in gates:
                await gate.aclose()


# ------------------------------------------------------------------------------------------------ the driver


async def random_sequence(w: World, steps: int) -> None:
    """``steps`` random steps, a probe every so often and at the end."""
    rng = w.rng

    async def check() -> None:
        await w.check()

    async def call() -> None:  # a check followed at once by its settle
        made = await w.check()
        if made is not None:
            billed = rng.random() < 0.85
            await w.settle(made, billed=billed, tokens=rng.randrange(0, 40) if billed else 0)

    async def burst() -> None:
        made: list[tuple[int, QuotaDecision, Snapshot | None]] = []

        async def one(index: int) -> None:
            decision = await w.gates[index].check(ORG)
            made.append((index, decision, w.snapshot_of(w.gates[index])))

        async with anyio.create_task_group() as tasks:
            for _ in range(rng.randrange(2, 9)):
                tasks.start_soon(one, rng.randrange(len(w.gates)))
        made.sort(key=lambda each: not each[1].allowed)  # (the allowed ones first: all counted when a refusal is)
        for index, decision, snap in made:
            w.judge(index, w.gates[index], decision, strict=False, snap=snap)

    async def settle() -> None:
        flight = w.in_flight()
        if flight:
            billed = rng.random() < 0.75
            await w.settle(rng.choice(flight), billed=billed, tokens=rng.randrange(0, 40) if billed else 0)

    async def deliver() -> None:
        for each in w.undelivered():
            if rng.random() < 0.5:
                await w.deliver(each)

    async def others() -> None:
        w.external(rng.randrange(1, 4))

    async def step() -> None:
        kind = rng.random()
        if kind < 0.55:
            seconds = rng.uniform(0.05, 2.0)
        elif kind < 0.8:
            seconds = rng.uniform(2.0, 12.0)
        elif kind < 0.95:
            seconds = rng.uniform(25.0, 45.0)  # past the TTL
        else:
            seconds = rng.uniform(300.0, 700.0)  # past plan_ttl, and Lago's biller run after a boundary
        await w.advance(seconds)

    async def boundary() -> None:
        """To just before or just after the period's end."""
        _, end = w.period()
        target = end + rng.uniform(-3.0, 3.0)
        if target > w.now():
            await w.advance(target - w.now())

    async def later() -> None:
        """Past the rollover window (an hour): the org is read again, not rolled over."""
        await w.advance(rng.uniform(3700.0, 7200.0))

    async def replan() -> None:
        plan = w.plan()
        if rng.random() < 0.35:
            target = "big" if plan == "small" else "small"
            w.say(f"plan: {plan} -> {target} ({'upgrade' if target == 'big' else 'downgrade, at the period end'})")
            w.fake.add_subscription(ORG, target, external_id=ORG)
        elif rng.random() < 0.2:  # the plan's own limit, for every subscription on it (plan.updated)
            calls = rng.randrange(2, 14)
            w.say(f"plan: {plan}'s max_api_calls set to {calls}")
            w.fake.store.set_plan_entitlements(
                plan, {"entitlements": {"api_quota": {"max_api_calls": calls}}}, merge=True
            )
        else:  # an override near what the org used: the edge is where the gate can go wrong
            start, end = w.period()
            mine, others = w.own(start, end), w.others(start, end)
            privileges = {"max_api_calls": max(1, len(mine) + len(others) + rng.randrange(-1, 4))}
            if rng.random() < 0.3:
                used = sum(c.tokens for c in mine) + sum(e.tokens for e in others)
                privileges["max_tokens"] = max(1, used + rng.randrange(-10, 60))
            w.say(f"plan: overridden to {privileges}")
            w.fake.store.patch_sub_entitlements(ORG, None, {"entitlements": {"api_quota": privileges}})
        told = w.webhooks_seen
        await w.webhooks()
        if w.webhooks_seen == told:  # (no webhook for it: the app that changed it tells the gate)
            await rng.choice(w.gates).invalidate(ORG)

    async def usage_webhook() -> None:
        kind = rng.choice(sorted(USAGE_WEBHOOK_TYPES))
        w.say(f"webhook {kind}")
        await rng.choice(w.gates).invalidate(ORG, webhook_type=kind)

    async def outage() -> None:
        w.outage(not w.down, rng.choice((503, 503, 429)))

    async def refreshes() -> None:
        await w.settled()

    async def let_run() -> None:
        for _ in range(rng.randrange(1, 6)):
            await anyio.lowlevel.checkpoint()

    actions: list[tuple[float, Callable[[], Awaitable[None]]]] = [
        (10, check),
        (10, call),
        (4, burst),
        (12, settle),
        (4, deliver),
        (3, others),
        (14, step),
        (1.5, boundary),
        (0.3, later),
        (3, replan),
        (1, usage_webhook),
        (1, outage),
        (3, refreshes),
        (3, let_run),
    ]
    weights = [weight for weight, _ in actions]
    for number in range(steps):
        await rng.choices([action for _, action in actions], weights)[0]()
        if number % 40 == 39:
            await w.probe()
    await w.probe()


MID_MONTH = dt.datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
MONTH_END = dt.datetime(2026, 3, 31, 23, 58, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _no_first_spread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshots due exactly a TTL after their read (no random part: a seed replays the same sequence)."""
    monkeypatch.setattr(_quota, "_FIRST_SPREAD", 0.0)


@pytest.mark.parametrize("seed", [*range(1, 11), 61])
async def test_random_sequences_in_process(seed: int) -> None:
    """In process: no seed finds a call allowed over the limit, one refused below it (but for unsure blocks), a
    call left in flight or tokens counted wrong."""
    start = MONTH_END if seed % 2 else MID_MONTH
    async with world(seed, start=start, fail_open=seed % 4 < 2) as w:
        await random_sequence(w, STEPS)


@needs_redis
@pytest.mark.parametrize("seed", range(101, 107))
async def test_random_sequences_two_workers_on_redis(seed: int, redis_url: str) -> None:
    """Two gates on one redis-server (two workers): the same invariants, for the fleet's count."""
    start = MONTH_END if seed % 2 else MID_MONTH
    async with world(seed, start=start, fail_open=seed % 4 < 2, redis_url=redis_url, workers=2) as w:
        await random_sequence(w, STEPS)


# ------------------------------------------------------------------------------------------------ found by the seeds


async def calls_at_the_limit(w: World, gate: int = 0) -> None:
    """The org's whole limit used on ``gate`` (6 calls of 10 tokens), delivered, and 10 s old."""
    for _ in range(SMALL["max_api_calls"]):
        call = await w.check(gate)
        assert call is not None
        await w.settle(call, billed=True, tokens=10)
    for call in w.undelivered():
        await w.deliver(call)
    await w.advance(10)


@needs_redis
async def test_enforce_usage_limits_on_a_worker_after_another_one_invalidated_the_org(redis_url: str) -> None:
    """A worker answers ``enforce_usage_limits`` from the fleet's state, not its own copy of a snapshot another worker
    dropped since (seed 101).

    Worker 1 read the org's snapshot; the org used its 6 calls; a webhook reached worker 2, which dropped the snapshot
    from Redis. Worker 1 kept its copy and peeked Redis's counters with it: Redis had no snapshot (missing), so the
    answer fell back to the copy's base alone: ``usage`` 0 calls, ``allowed: True`` for an org at its limit, until the
    copy fell due a TTL later."""
    async with world(101, start=MID_MONTH, fail_open=True, redis_url=redis_url, workers=2) as w:
        first, second = w.gates
        await calls_at_the_limit(w)
        assert not (await first.enforce_usage_limits(ORG))["allowed"]
        await second.invalidate(ORG, webhook_type="subscription.updated")
        answer = await first.enforce_usage_limits(ORG)
        assert answer["usage"] == {"max_api_calls": 6, "max_tokens": 60}
        assert not answer["allowed"] and answer["reason"] == "max_api_calls"
        assert answer["remaining"] == {"max_api_calls": 0, "max_tokens": 90}


@needs_redis
async def test_plan_helpers_on_a_worker_see_an_upgrade_another_worker_was_told_of(redis_url: str) -> None:
    """After an upgrade whose webhook reached worker 2, worker 1's seed helpers answer the new plan at once (they
    answered the old one from their copy until it fell due)."""
    async with world(102, start=MID_MONTH, fail_open=True, redis_url=redis_url, workers=2) as w:
        first, second = w.gates
        await calls_at_the_limit(w)
        assert (await first.get_org_plan_limits(ORG))["plan_code"] == "small"
        w.fake.add_subscription(ORG, "big", external_id=ORG)  # an upgrade: at once
        await second.invalidate(ORG, webhook_type="subscription.started")
        assert await first.get_org_plan_limits(ORG) == {
            "plan_code": "big",
            "max_api_calls": BIG["max_api_calls"],
            "max_tokens": BIG["max_tokens"],
            "source": "entitlements",
        }
        answer = await first.enforce_usage_limits(ORG)
        assert answer["allowed"] and answer["plan_code"] == "big"
        assert answer["limits"] == {"max_api_calls": BIG["max_api_calls"], "max_tokens": BIG["max_tokens"]}


@needs_redis
@pytest.mark.parametrize("fail_open", [True, False])
async def test_a_worker_that_waited_for_another_ones_read_reads_lago_after_an_invalidation(
    redis_url: str, fail_open: bool
) -> None:
    """A worker that waited for another worker's read of a cold org (the fleet's lock) reads Lago itself when the
    org's snapshot is dropped afterwards: its request is decided on the new read, not by ``LAGO_FAIL_OPEN`` with Lago
    answering (seed 105).

    Both workers got a request of a cold org at once: one read Lago, the other waited for that read and took it. A
    webhook reached the first worker moments later (a plan change: the snapshot dropped fleet-wide). The second
    worker's next request found no snapshot, and its refresh was refused as "failed recently" (the backoff every
    refresh sets when it starts, cleared only by storing a snapshot itself), so it went to the fail policy at once:
    served without a limit (``fail_open``) or answered 503, for up to ``failure_backoff`` seconds."""
    async with world(105, start=MID_MONTH, fail_open=fail_open, redis_url=redis_url, workers=2) as w:
        reader, waiter = w.gates
        reading, waiting, release = anyio.Event(), anyio.Event(), anyio.Event()
        fetch, wait_snapshot = reader.fetch, waiter.backend.wait_snapshot

        async def held_fetch(org_id: str, previous: Snapshot | None = None) -> Snapshot:
            reading.set()  # (the fleet's lock taken)
            await release.wait()
            return await fetch(org_id, previous)

        async def seen_wait(org_id: str, timeout: float, after: float = 0.0) -> None:  # noqa: ASYNC109
            waiting.set()
            await wait_snapshot(org_id, timeout, after)

        reader.fetch = held_fetch  # type: ignore[method-assign]
        waiter.backend.wait_snapshot = seen_wait  # type: ignore[method-assign]
        decisions: list[QuotaDecision] = []

        async def one(gate: QuotaGate) -> None:
            decisions.append(await gate.check(ORG))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(one, reader)
            await reading.wait()
            tasks.start_soon(one, waiter)
            await waiting.wait()  # (the waiter's refresh found the lock taken: it waits for the reader's snapshot)
            release.set()
        assert all(decision.allowed and decision.headers for decision in decisions)
        assert (reader.stats["refreshes"], waiter.stats["refreshes"]) == (1, 0)  # (one read for the fleet)
        await w.advance(0.5)
        w.fake.store.patch_sub_entitlements(ORG, None, {"entitlements": {"api_quota": {"max_api_calls": 3}}})
        await reader.invalidate(ORG, webhook_type="subscription.updated")
        decision = await waiter.check(ORG)
        assert decision.allowed and decision.headers  # (decided on a snapshot: RateLimit headers)
        assert dict(decision.headers)[b"ratelimit-limit"] == b"3"
        assert waiter.stats["fail_open"] == waiter.stats["fail_closed"] == 0
        assert waiter.stats["refreshes"] == 1


@needs_redis
async def test_a_worker_whose_refresh_found_another_ones_read_stored_reads_lago_after_an_invalidation(
    redis_url: str,
) -> None:
    """The same when the worker's refresh looked only once the other worker had stored its read (seed 2015): the
    snapshot it found was that read, which it took as its own (nothing failed), and a webhook dropping it moments later
    has the worker's next request read Lago again, not answered 503."""
    async with world(2015, start=MID_MONTH, fail_open=False, redis_url=redis_url, workers=2) as w:
        reader, waiter = w.gates
        for gate in (reader, waiter):
            assert (await gate.check(ORG)).headers
        await w.settled()
        await w.advance(TTL + 1)  # (due on both)
        go, looked = anyio.Event(), anyio.Event()
        try_lock = waiter.backend.try_lock

        async def late_lock(org_id: str, ttl: float, now: float) -> bool:
            await go.wait()  # (its refresh asks for the fleet's lock once the reader's read is stored)
            try:
                return await try_lock(org_id, ttl, now)
            finally:
                looked.set()

        waiter.backend.try_lock = late_lock  # type: ignore[method-assign]
        assert (await waiter.check(ORG)).headers  # (due: its refresh waits for the lock)
        assert (await reader.check(ORG)).headers  # (due: read and stored)
        while reader._refreshing:
            await anyio.lowlevel.checkpoint()
        go.set()
        await looked.wait()
        while waiter._refreshing:  # (the lock held by the reader: it found the reader's snapshot)
            await anyio.lowlevel.checkpoint()
        waiter.backend.try_lock = try_lock  # type: ignore[method-assign]
        assert (reader.stats["refreshes"], waiter.stats["refreshes"]) == (2, 0)  # (the reader read both times)
        await w.advance(0.5)
        w.fake.store.patch_sub_entitlements(ORG, None, {"entitlements": {"api_quota": {"max_api_calls": 9}}})
        await reader.invalidate(ORG, webhook_type="subscription.updated")
        decision = await waiter.check(ORG)
        assert decision.allowed and dict(decision.headers)[b"ratelimit-limit"] == b"9"  # (on the new read)
        assert waiter.stats["fail_closed"] == 0


@needs_redis
@pytest.mark.parametrize("fail_open", [True, False])
async def test_a_request_joining_a_wait_for_a_snapshot_dropped_since_has_the_org_read(
    redis_url: str, fail_open: bool
) -> None:
    """A request of an org whose snapshot was dropped (a webhook) while this worker's refresh of it waited for
    another worker's read is decided on a new read, not by ``LAGO_FAIL_OPEN`` with Lago answering (seed 101).

    Both workers found the org's snapshot due: worker 1 took the fleet's lock and read Lago, worker 2's refresh waited
    for that read. Worker 1 stored it, and a plan change's webhook dropped it before worker 2 looked. Worker 2's
    refresh went on waiting (``cold_timeout``) for a snapshot no worker was reading, though the invalidation had freed
    the lock; the request that came meanwhile joined that wait, found nothing at its end, and was served without a
    limit (``fail_open``) or answered 503."""
    async with world(101, start=MID_MONTH, fail_open=fail_open, redis_url=redis_url, workers=2) as w:
        reader, waiter = w.gates
        for gate in (reader, waiter):
            assert (await gate.check(ORG)).headers
        await w.settled()
        await w.advance(TTL + 1)  # (due on both)
        reading, release, waiting, go = anyio.Event(), anyio.Event(), anyio.Event(), anyio.Event()
        fetch, wait_snapshot = reader.fetch, waiter.backend.wait_snapshot

        async def held_fetch(org_id: str, previous: Snapshot | None = None) -> Snapshot:
            reading.set()  # (the fleet's lock taken)
            await release.wait()
            return await fetch(org_id, previous)

        async def held_wait(org_id: str, timeout: float, after: float = 0.0) -> None:  # noqa: ASYNC109
            waiting.set()
            await go.wait()  # (its first look at Redis comes after the snapshot was dropped)
            await wait_snapshot(org_id, timeout, after)

        reader.fetch = held_fetch  # type: ignore[method-assign]
        waiter.backend.wait_snapshot = held_wait  # type: ignore[method-assign]
        assert (await reader.check(ORG)).headers  # (due: read in the background)
        await reading.wait()
        assert (await waiter.check(ORG)).headers  # (due: its refresh waits for the reader's)
        await waiting.wait()
        release.set()
        while reader._refreshing:  # (stored)
            await anyio.lowlevel.checkpoint()
        w.fake.store.patch_sub_entitlements(ORG, None, {"entitlements": {"api_quota": {"max_api_calls": 9}}})
        await reader.invalidate(ORG, webhook_type="subscription.updated")
        decisions: list[QuotaDecision] = []

        async def request() -> None:
            decisions.append(await waiter.check(ORG))

        cold_waits = waiter.stats["cold_waits"]
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(request)
            while waiter.stats["cold_waits"] == cold_waits:  # (joined the refresh in flight)
                await anyio.lowlevel.checkpoint()
            go.set()
        (decision,) = decisions
        assert decision.allowed and dict(decision.headers)[b"ratelimit-limit"] == b"9"  # (on the new read)
        assert waiter.stats["fail_open"] == waiter.stats["fail_closed"] == 0


async def test_a_read_answered_after_the_period_end_leaves_the_next_request_to_read_the_new_period(
    redis: str | None,
) -> None:
    """A refresh asked just before the billing period's end and answered after it does not keep the org from being
    read again: its next request reads the new period (seed 2059).

    An org with a pending downgrade (it switches plans at the boundary: its snapshot is not rolled over) had its
    snapshot refreshed as the period ended: the read began at 23:59:59.5 and came back at 00:00:00.5, with March,
    over at once. The refresh kept its "failed recently" backoff, as it does when Lago's clock is behind (Lago still
    in March after the end by this clock): the org's requests for the next ``failure_backoff`` seconds found no
    snapshot and asked Lago nothing, answered 503 (or served without a limit with ``fail_open``) while Lago answered;
    with Redis, on every worker. A call of March in flight then is not April's, its tokens included."""
    async with world(2059, start=MONTH_END, fail_open=False, redis_url=redis, workers=1) as w:
        (gate,) = w.gates
        w.fake.add_subscription(ORG, "big", external_id=ORG)  # (an upgrade, at once)
        w.fake.add_subscription(ORG, "small", external_id=ORG)  # a downgrade, at the period's end
        await w.webhooks()
        assert (await gate.check(ORG)).headers
        _, end = w.period()
        await w.advance(end - 1.5 - w.now())
        march, march_at = await gate.check(ORG), w.now()  # a call in flight across the end, billed in March (its date)
        assert march.allowed
        await w.advance(1)  # (due: read in the background at 23:59:59.5)
        fetch = gate.fetch

        async def read_across_the_end(org_id: str, previous: Snapshot | None = None) -> Snapshot:
            gate.fetch = fetch  # type: ignore[method-assign]
            snapshot = await fetch(org_id, previous)
            w.clock.advance(1.0)  # (answered at 00:00:00.5)
            return snapshot

        gate.fetch = read_across_the_end  # type: ignore[method-assign]
        assert (await gate.check(ORG)).headers
        await w.settled()
        assert w.now() > end
        decision = await gate.check(ORG)
        assert decision.allowed and decision.headers, decision.problem
        assert dict(decision.headers)[b"ratelimit-reset"] == b"%d" % math.ceil(end + 30 * 86400 - w.now())  # April's
        assert gate.stats["fail_closed"] == 0
        gate.settle(ORG, decision, tokens=0, billed=False)
        # The March call ends, billed, its tokens settled when its event is built (as the middleware does): none of it
        # is April's (its records were carried over to April, as for a period begun within the one counted)
        gate.settle(ORG, march, tokens=0, billed=True)
        gate.settle(ORG, _tokens_only(getattr(march, "period", ""), int(march_at)), tokens=40, billed=False)
        await w.flush(gate)
        assert (await gate.enforce_usage_limits(ORG))["usage"] == {"max_api_calls": 0, "max_tokens": 0}


async def test_calls_let_through_before_the_first_snapshot_and_its_period_are_not_counted_in_it(
    redis: str | None,
) -> None:
    """Calls let through without a snapshot (``LAGO_FAIL_OPEN``, Lago's reads failing) before the period of the first
    snapshot began are not counted in that period, in flight nor once settled (seed 1013).

    The org was upgraded during the outage: its new subscription's period began after the call, whose event (dated
    at its check) Lago bills to the old one. The records made before any snapshot were all taken as the first
    snapshot's period's: the call, still in flight, counted there, refusing the org below its new limit as a sure
    block (``Retry-After``: the period's end), and so did its settle once billed. (A call settled before the first
    snapshot is recorded when it ended, which only the first read's ``settle_lag`` covers: counted there as an unsure
    record, as documented.)"""
    async with world(1013, start=MID_MONTH, fail_open=True, redis_url=redis) as w:
        (gate,) = w.gates
        w.outage(True)
        early = await w.check()  # served blind
        assert early is not None and early.blind
        await w.advance(2)
        w.fake.add_subscription(ORG, "big", external_id=ORG)  # upgraded meanwhile: a period from now on
        w.outage(False)
        await w.advance(BACKOFF + 1)
        decisions = [await gate.check(ORG) for _ in range(BIG["max_api_calls"] + 1)]
        assert [decision.allowed for decision in decisions] == [True] * BIG["max_api_calls"] + [False]
        assert dict(decisions[0].headers)[b"ratelimit-remaining"] == b"%d" % (BIG["max_api_calls"] - 1)
        await w.settle(early, billed=True, tokens=10)
        await w.deliver(early)  # (billed to the old subscription: dated before the new one began)
        assert (await gate.enforce_usage_limits(ORG))["usage"] == {
            "max_api_calls": BIG["max_api_calls"],
            "max_tokens": 0,
        }


async def test_the_ended_periods_calls_are_not_counted_in_the_next_one_read_before_any_request(
    redis: str | None,
) -> None:
    """The calls of a period that ended are not counted in the next one when the next one is read before any request
    of the org rolled the old one over (a seed helper asked first, ``enforce_usage_limits``): not one settled after the
    end (recorded then), not the tokens of one settled later still, when its event is built.

    (The org switches plans at the boundary, a pending downgrade: its snapshot is not rolled over.) The read of April
    found the counts of March and carried them over as for a period begun within March (an upgrade): the call
    recorded after midnight counted in April, and March's tokens settled afterwards were taken too (March being the
    period carried from), refusing the org below its limit until they were a TTL old."""
    async with world(2059, start=MONTH_END, fail_open=False, redis_url=redis) as w:
        (gate,) = w.gates
        w.fake.add_subscription(ORG, "big", external_id=ORG)  # (an upgrade, at once)
        w.fake.add_subscription(ORG, "small", external_id=ORG)  # a downgrade, at the period's end
        await w.webhooks()
        _, end = w.period()
        await w.advance(end - 2 - w.now())
        early, late = await w.check(), await w.check()  # March's, in flight across the end
        assert early is not None and late is not None
        await w.advance(3)
        await w.settle(early, billed=True, tokens=30)  # ended after midnight: recorded in April's first seconds
        await gate.enforce_usage_limits(ORG)  # April read first by a seed helper
        gate.settle(ORG, late.decision, tokens=0, billed=True)  # its tokens when its event is built:
        gate.settle(ORG, _tokens_only(getattr(late.decision, "period", ""), int(late.checked)), tokens=40, billed=False)
        await w.flush(gate)
        assert (await gate.enforce_usage_limits(ORG))["usage"] == {"max_api_calls": 0, "max_tokens": 0}
