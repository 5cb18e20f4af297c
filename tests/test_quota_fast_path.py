"""QuotaGate.check_now's and settle's fast paths (an in-process gate, an org cached in its period, an allowed call)
decide, count and answer exactly as the general path does; their caches (the period key per snapshot, the limit and
reset header pairs) follow the usage, the clock and the period."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import pytest

from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._gate import QuotaDecision
from lago_org_billing._periods import period_key
from lago_org_billing._quota import QuotaConfig, QuotaGate, _Decision
from lago_org_billing._snapshots import Snapshot

NOW = 1_700_000_000.25


class Clock:
    def __init__(self) -> None:
        self.at = NOW

    def time(self) -> float:
        return self.at


def make_gate(clock: Clock, *, mode: Literal["enforce", "monitor"] = "enforce", **config: Any) -> QuotaGate:
    settings = BillingSettings(api_key="k", max_retries=0, quota_mode=mode)
    return QuotaGate(settings, LagoClient(settings), config=QuotaConfig(**config), clock=clock.time)


def snapshot(now: float, **changes: Any) -> Snapshot:
    values: dict[str, Any] = {
        "active": True,
        "plan_code": "starter",
        "period_start": now - 3600.5,
        "period_end": now + 86400.7,
        "requested_at": now,
        "fetched_at": now,
        "plan_fetched_at": now,
        "refresh_at": now + 30,
    }
    values.update(changes)
    return Snapshot(**values)


def general(gate: QuotaGate, org_id: str) -> QuotaDecision | None:
    """check_now's general path (what it was before the fast path)."""
    now = gate.clock()
    outcome = gate.local.reserve_now(org_id, now, "force" if gate.mode == "monitor" else "normal")
    if outcome.code == 0:
        return None
    gate.stats["checks"] += 1
    return gate._cached(org_id, outcome, now)


def general_settle(gate: QuotaGate, org_id: str, decision: _Decision, *, tokens: int, billed: bool) -> None:
    """settle's general path for a decision of this gate's in-process backend: LocalBackend.settle."""
    if decision.reserved or billed or tokens > 0:
        bucket = decision.bucket if decision.reserved else None
        gate.local.settle(org_id, decision.period, bucket, gate.clock(), tokens=tokens, billed=billed)


def fields(decision: QuotaDecision | None, gate: QuotaGate) -> dict[str, Any] | None:
    if decision is None:
        return None
    values = {field.name: getattr(decision, field.name) for field in dataclasses.fields(decision)}
    assert values.pop("backend", None) in (None, gate.local)
    return values


def counts(gate: QuotaGate, org_id: str) -> tuple[int, int, dict[int, int], dict[int, int], dict[int, int], str]:
    state = gate.local._orgs[org_id].counts
    return state.calls, state.tokens, dict(state.c), dict(state.t), dict(state.i), state.period


LIMITS = [
    {"calls_limit": 5},
    {"tokens_limit": 40},
    {"calls_limit": 5, "tokens_limit": 40},
    {"calls_limit": 1000, "tokens_limit": 40},
    {"calls_limit": 4, "tokens_limit": 10**6},
    {"calls_limit": 10, "tokens_limit": 45},  # (as close to both at the second request: 8 of 10, 36 of 45 left)
    {},
]


@pytest.mark.parametrize("limits", LIMITS)
@pytest.mark.parametrize("mode", ["enforce", "monitor"])
@pytest.mark.parametrize("headers", [True, False])
def test_the_fast_path_decides_counts_and_answers_as_the_general_path(
    limits: dict[str, int], mode: Literal["enforce", "monitor"], headers: bool
) -> None:
    """Two gates on one clock and snapshot, one through check_now (fast path), one through the general path: the
    same decisions (headers included) request after request, up to and past the limit, with tokens settled between
    them and the clock moving (the reset counts down), the same records and stats."""
    clock = Clock()
    fast, slow = make_gate(clock, mode=mode, headers=headers), make_gate(clock, mode=mode, headers=headers)
    for gate in (fast, slow):
        gate.local.store_now("org_1", snapshot(NOW, base_tokens=9, **limits), NOW)
        gate._refreshing["org_1"] = None  # type: ignore[assignment]  # (its refresh in flight: none spawned here)
    for step in range(8):
        one, other = fast.check_now("org_1"), general(slow, "org_1")
        assert fields(one, fast) == fields(other, slow), step
        assert isinstance(one, _Decision) and isinstance(other, _Decision)
        fast.settle("org_1", one, tokens=0, billed=one.reserved)
        fast.settle("org_1", dataclasses.replace(one, reserved=False), tokens=step, billed=False)
        general_settle(slow, "org_1", other, tokens=0, billed=other.reserved)
        general_settle(slow, "org_1", dataclasses.replace(other, reserved=False), tokens=step, billed=False)
        assert counts(fast, "org_1") == counts(slow, "org_1")
        clock.at += 0.7
    assert fast.stats == slow.stats


def test_headers_follow_the_usage_the_clock_and_a_new_period() -> None:
    clock = Clock()
    gate = make_gate(clock)
    gate._refreshing["org_1"] = None  # type: ignore[assignment]
    first = snapshot(NOW, calls_limit=10)
    gate.local.store_now("org_1", first, NOW)

    def check() -> tuple[_Decision, dict[str, str]]:
        decision = gate.check_now("org_1")
        assert isinstance(decision, _Decision) and decision.allowed
        return decision, {name.decode(): value.decode() for name, value in decision.headers}

    decision, headers = check()
    assert headers == {"ratelimit-limit": "10", "ratelimit-remaining": "9", "ratelimit-reset": "86401"}
    assert decision.period == period_key(first)
    assert gate.local._orgs["org_1"].key_of is first  # (the fast path answered)
    clock.at += 1.0
    decision, headers = check()
    assert headers == {"ratelimit-limit": "10", "ratelimit-remaining": "8", "ratelimit-reset": "86400"}
    # the next period, another limit (a snapshot stored since: its period key and headers, not the cached ones)
    later = NOW + 86401.0
    clock.at = later
    second = snapshot(later, calls_limit=20, period_start=NOW + 86400.7, period_end=NOW + 2 * 86400.7)
    gate.local.store_now("org_1", second, later)
    decision, headers = check()
    assert decision.period == period_key(second) != period_key(first)
    assert headers == {"ratelimit-limit": "20", "ratelimit-remaining": "19", "ratelimit-reset": "86401"}
    decision, headers = check()
    assert headers["ratelimit-remaining"] == "18"
    # over the limit: the general path's answer (a 429 with Retry-After), not the fast one
    gate.local.store_now("org_1", snapshot(later, calls_limit=2, period_start=second.period_start), later)
    assert gate.check_now("org_1").allowed is False  # type: ignore[union-attr]
