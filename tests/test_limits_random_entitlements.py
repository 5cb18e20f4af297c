"""Per-org limits from Lago subscriptions and entitlements, checked against an independent model of the documented
mapping on seeded random payloads.

The mapping (README "Quota gating", ``LAGO_PLAN_LIMITS``; ``_limits.limits_from_entitlements``): the limits are the
privileges ``max_api_calls`` and ``max_tokens`` (``LAGO_QUOTA_CALLS_PRIVILEGE`` / ``LAGO_QUOTA_TOKENS_PRIVILEGE``) of
the feature ``api_quota`` (``LAGO_QUOTA_FEATURE``), other features and privileges aside. A privilege's value is its
``value`` (Lago: the subscription's override if set, else the plan's), else ``override_value``, else ``plan_value``; no
value at all is no limit. A whole number >= 0, as a number or as a string of one (Lago's string and select privileges
are strings), is the limit, held to 2**53 - 1; anything else (negative, fractional, a boolean, a word) is ignored, said
once, so that the plan's ``LAGO_PLAN_LIMITS`` entry applies, as it does for a limit no privilege sets. Entitlements win
over ``LAGO_PLAN_LIMITS`` limit by limit; ``LAGO_PLAN_LIMITS`` alone when the subscription has none, or when Lago serves
none (an older Lago, or a free licence: its 404 or 403); an entitlements read that fails otherwise is an error, not a
fallback.

Three ways in: payloads handed to ``limits_from_entitlements`` directly (drift included: nulls, duplicated codes,
numbers and strings of every shape, privileges keyed by their codes as lago-api served them in mid-2025); plans,
per-subscription overrides and removals made on the emulator (``lago_org_billing.testing``) and read back through
``LagoClient`` (``GET /subscriptions/{id}/entitlements`` and the entitlements embedded in ``GET /subscriptions/{id}``)
and through ``QuotaGate.get_org_plan_limits`` with a random ``LAGO_PLAN_LIMITS``; and a Lago that serves no
entitlements, none for a plan, or fails reading them.

The model parses numbers on its own (a regular expression and integer arithmetic, no ``Decimal``). The seeds below are
fixed; while reviewing, 20,000 direct seeds (250 payloads each), 400 emulator seeds and 150 seeds of the fallbacks
were run."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from lago_org_billing import BillingSettings, LagoClient, _limits
from lago_org_billing._errors import LagoAPIError
from lago_org_billing._limits import limits_from_entitlements
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

SEEDS = (1, 2, 3, 4, 5, 6, 7, 8)  # fixed: a failure names its seed, to be kept below as a named case
PAYLOADS_PER_SEED = 250
LARGEST = 2**53 - 1
START = dt.datetime(2026, 3, 10, 12, 0, tzinfo=dt.timezone.utc)

# ------------------------------------------------------------------------------------------------------ the model

#: A decimal number as Lago's string privileges may hold one: sign, digits, an optional fraction and exponent, blanks
#: around. (Python's own extras, ``1_000``, non-ASCII digits, ``Infinity``, are never generated: not Lago's concern.)
_NUMBER = re.compile(r"\s*([+-]?)(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?\s*")


@dataclass(frozen=True)
class Limit:
    """A privilege's reading: ``kind`` ``limit`` (``value`` the limit, ``None`` for no limit) or ``ignored``."""

    kind: str
    value: int | None = None


UNLIMITED = Limit("limit", None)
IGNORED = Limit("ignored")


def _whole_of_text(text: str) -> Limit:
    match = _NUMBER.fullmatch(text)
    if match is None or not (match.group(2) or match.group(3)):
        return IGNORED
    sign, whole, fraction, exponent = match.group(1), match.group(2), match.group(3) or "", match.group(4)
    digits = (whole + fraction).lstrip("0")
    if not digits:
        return Limit("limit", 0)  # (zero, whatever its sign and exponent)
    if sign == "-":
        return IGNORED
    # value = int(digits) * 10**scale, digits without leading zeros
    scale = int(exponent or 0) - len(fraction)
    if scale < 0:
        kept = digits[:scale] if -scale < len(digits) else ""
        if digits[len(kept) :].strip("0"):
            return IGNORED  # (a fraction left: not a whole number)
        digits, scale = kept.lstrip("0"), 0
        if not digits:
            return Limit("limit", 0)
    if len(digits) + scale > 16:  # (at least 10**16: past 2**53 - 1)
        return Limit("limit", LARGEST)
    return Limit("limit", min(int(digits) * 10**scale, LARGEST))


def reading(value: Any) -> Limit:
    """What the documented mapping makes of one privilege value, as Lago's JSON may carry it."""
    if value is None:
        return UNLIMITED
    if isinstance(value, bool):
        return IGNORED
    if isinstance(value, int):
        return IGNORED if value < 0 else Limit("limit", min(value, LARGEST))
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0 or not value.is_integer():
            return IGNORED
        return Limit("limit", min(int(value), LARGEST))
    if isinstance(value, str):
        return _whole_of_text(value)
    return IGNORED


def model_limits(entitlements: Any, config: QuotaConfig) -> dict[str, int | None]:
    """The limits the documented mapping reads from ``entitlements`` (a subscription's, as Lago serves them).

    Entries read in order: a privilege set again (duplicated codes, never sent by Lago) replaces what an earlier one
    set when readable; an ignored value leaves it."""
    limits: dict[str, int | None] = {}
    if not isinstance(entitlements, list):
        return limits
    for feature in entitlements:
        if not isinstance(feature, dict) or feature.get("code") != config.feature_code:
            continue
        privileges = feature.get("privileges")
        if isinstance(privileges, dict):  # (keyed by their codes, as lago-api served them in mid-2025)
            privileges = [{"code": code, **p} if isinstance(p, dict) else p for code, p in privileges.items()]
        for privilege in privileges if isinstance(privileges, list) else []:
            if not isinstance(privilege, dict):
                continue
            code = privilege.get("code")
            if code not in (config.calls_privilege, config.tokens_privilege):
                continue
            value = next(
                (privilege[k] for k in ("value", "override_value", "plan_value") if privilege.get(k) is not None), None
            )
            read = reading(value)
            if read.kind == "limit":
                limits[code] = read.value
    return limits


def model_gate(
    plan_code: str, granted: Mapping[str, int | None], table: Mapping[str, Mapping[str, int]], config: QuotaConfig
) -> dict[str, Any]:
    """``QuotaGate.get_org_plan_limits`` as documented: ``LAGO_PLAN_LIMITS``'s entry for the plan (held to 2**53 - 1),
    each limit the entitlements set replacing its entry."""
    limits: dict[str, int | None] = {}
    source = "none"
    if plan_code in table:
        limits = {name: min(limit, LARGEST) for name, limit in table[plan_code].items()}
        source = "plan_limits"
    if granted:
        limits.update(granted)
        source = "entitlements"
    return {
        "plan_code": plan_code,
        config.calls_privilege: limits.get(config.calls_privilege),
        config.tokens_privilege: limits.get(config.tokens_privilege),
        "source": source,
    }


def test_the_model_reads_numbers_as_documented() -> None:
    """The model's own number reading: whole numbers >= 0 in any notation are limits, the rest ignored."""
    limits = {"300": 300, " 42 ": 42, "+7": 7, "300.0": 300, "3.000": 3, "1e3": 1000, "1.5e3": 1500, "00012": 12}
    limits |= {
        "0": 0,
        "-0": 0,
        "0.0": 0,
        "0e-7": 0,
        "1" * 5000: LARGEST,
        "1e999999": LARGEST,
        "9007199254740991": LARGEST,
        "9007199254740992": LARGEST,
        "1.5e15": 1_500_000_000_000_000,
    }
    for text, limit in limits.items():
        assert reading(text) == Limit("limit", limit), text
    for text in ("2.5", "0.5", "1e-3", "99.99", "-1", "-1e3", "", ".", "e3", "1,000", "unlimited", "0x10", "1e", "NaN"):
        assert reading(text) == IGNORED, text
    assert [reading(v) for v in (None, True, 2.5, 300.0, -1, 10**400)] == [
        UNLIMITED,
        IGNORED,
        IGNORED,
        Limit("limit", 300),
        IGNORED,
        Limit("limit", LARGEST),
    ]


# ------------------------------------------------------------------------------------------ random direct payloads

_INTS = [0, 1, 5, 300, 10_000, -1, -5, 2**53 - 1, 2**53, 2**53 + 1, 10**30, 10**400]
_FLOATS = [0.0, -0.0, 300.0, 2.5, 0.5, 1e-7, 1e16, 1e20, 1e308, -1.0, math.inf, -math.inf, math.nan]
_TEXTS = [
    "0", "7", "300", " 300 ", "+7", "00012", "-0", "300.0", "3.000", "2.5", "0.5", "99.99", "1e3", "1.5e3", "1E3",
    "1e-3", "2.50e1", "25e-1", "-1", "-1e3", "", " ", "unlimited", "1,000", "0x10", "1e", ".", "Infinity", "NaN",
    "true", "9007199254740991", "9007199254740992", "1e999999", "1e-999999", "1" * 5000,
    "1.0000000000000000000000000000001",
]  # fmt: skip
_OTHERS: list[Any] = [None, True, False, [], {}, [5], {"value": 5}]


def random_value(r: random.Random) -> Any:
    pool = r.choice((_INTS, _FLOATS, _TEXTS, _TEXTS, _OTHERS))
    return r.choice(pool)


def random_config(r: random.Random) -> QuotaConfig:
    if r.random() < 0.7:
        return QuotaConfig()
    return QuotaConfig(feature_code="quota", calls_privilege="calls", tokens_privilege="tokens")


def random_privilege(r: random.Random, config: QuotaConfig) -> Any:
    if r.random() < 0.05:
        return r.choice([None, "max_api_calls", 5])
    code = r.choice(
        [config.calls_privilege, config.tokens_privilege, config.calls_privilege, "max", "root", "MAX_API_CALLS", None]
    )
    privilege: dict[str, Any] = {"code": code, "name": None, "value_type": r.choice(["integer", "string", "select"])}
    privilege["config"] = {"select_options": ["100", "2.5"]} if privilege["value_type"] == "select" else {}
    if r.random() < 0.5:  # as Lago writes it: value = the override if set, else the plan's
        plan, override = random_value(r), random_value(r) if r.random() < 0.4 else None
        privilege |= {"value": override if override is not None else plan, "plan_value": plan}
        privilege["override_value"] = override
    else:  # drifting: any of the three, any value, or absent
        for key in ("value", "plan_value", "override_value"):
            if r.random() < 0.6:
                privilege[key] = random_value(r)
    return privilege


def random_entitlements(r: random.Random, config: QuotaConfig) -> Any:
    if r.random() < 0.04:
        return r.choice([None, {}, {"api_quota": {"max_api_calls": 5}}, "api_quota"])
    features: list[Any] = []
    for _ in range(r.randint(0, 4)):
        if r.random() < 0.05:
            features.append(r.choice([None, "api_quota", 7]))
            continue
        code = r.choice([config.feature_code, config.feature_code, "seats", "api_quota", "sso", None, ""])
        privileges: Any = [random_privilege(r, config) for _ in range(r.randint(0, 4))]
        if r.random() < 0.15:  # keyed by their codes (the code inside kept, or left out)
            keyed = [p for p in privileges if isinstance(p, dict) and isinstance(p.get("code"), str)]
            privileges = {p["code"]: p for p in keyed}
            for key, privilege in privileges.items():
                if r.random() < 0.3:
                    privileges[key] = {k: v for k, v in privilege.items() if k != "code"}
        elif r.random() < 0.04:
            privileges = r.choice([None, {}, "max_api_calls"])
        features.append({"code": code, "name": None, "description": None, "privileges": privileges, "overrides": {}})
    return features


@pytest.mark.parametrize("seed", SEEDS)
def test_random_entitlement_payloads_give_the_documented_limits(seed: int) -> None:
    """Entitlements as Lago sends them (and as a drifting one might): the limits are those of the documented mapping,
    each a whole number in [0, 2**53 - 1] or None, never an exception."""
    r = random.Random(seed)
    for _ in range(PAYLOADS_PER_SEED):
        config = random_config(r)
        entitlements = random_entitlements(r, config)
        limits = limits_from_entitlements(entitlements, config)
        assert limits == model_limits(entitlements, config), (seed, entitlements)
        assert all(v is None or (type(v) is int and 0 <= v <= LARGEST) for v in limits.values())


# ----------------------------------------------------------------------------------- through the emulator and gate


class Clock:
    """The emulator's and the gate's clock, fixed: nothing here depends on time passing."""

    def now(self) -> dt.datetime:
        return START

    def time(self) -> float:
        return START.timestamp()


#: Values Lago accepts for a privilege of each type (lago-api ``CreateOrUpdateConcern#validate_value``: an integer or a
#: string of one; any string; one of the select options; true/false or their strings), and how it serves them back
#: (``Utils::Entitlement.cast_value``: ``to_i``, a boolean, the string itself).
_LAGO_INTEGERS: list[Any] = [
    0,
    1,
    7,
    300,
    10_000,
    -1,
    -5,
    2**53 - 1,
    2**53,
    10**30,
    "0",
    "300",
    "-1",
    "12345678901234567890",
]
_LAGO_TEXTS = ["300", "0", "2.5", "0.5", "99.99", "1e3", "1.5e3", "300.0", "unlimited", "1,000", " 42 ", "-3", "1" * 30]
_LAGO_BOOLEANS: list[Any] = [True, False, "true", "false"]


def lago_value(r: random.Random, privilege: Mapping[str, Any]) -> Any:
    kind = privilege["value_type"]
    if kind == "integer":
        return r.choice(_LAGO_INTEGERS)
    if kind == "string":
        return r.choice(_LAGO_TEXTS)
    if kind == "select":
        return r.choice(privilege["config"]["select_options"])
    return r.choice(_LAGO_BOOLEANS)


def served(value: Any, kind: str) -> Any:
    """A stored value as Lago serves it back for its type."""
    if kind == "integer":
        return int(value)
    if kind == "boolean":
        return value if isinstance(value, bool) else value == "true"
    return str(value)


def random_feature(r: random.Random, code: str, names: list[str]) -> dict[str, Any]:
    privileges = []
    for name in names:
        kind = r.choice(["integer", "integer", "string", "select", "boolean"])
        config = {"select_options": r.sample(_LAGO_TEXTS, 3)} if kind == "select" else {}
        privileges.append({"code": name, "value_type": kind, "config": config})
    return {"code": code, "privileges": privileges}


def random_values(r: random.Random, feature: Mapping[str, Any]) -> dict[str, Any]:
    chosen = [p for p in feature["privileges"] if r.random() < 0.7]
    return {p["code"]: lago_value(r, p) for p in chosen}


def random_table(r: random.Random, plans: list[str], config: QuotaConfig) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for plan in plans:
        if r.random() < 0.5:
            names = [n for n in (config.calls_privilege, config.tokens_privilege) if r.random() < 0.6]
            table[plan] = {name: r.choice([0, 2, 50, 10**6, 2**70]) for name in names}
    return table


def integer_privilege(code: str) -> dict[str, str]:
    """A privilege of integer values (named: Lago's default type is ``string``, which takes no numbers)."""
    return {"code": code, "value_type": "integer"}


def client_on(transport: httpx.AsyncBaseTransport) -> LagoClient:
    return LagoClient(BillingSettings(api_url="http://lago.test", api_key="k", max_retries=0), transport=transport)


def gate_on(client: LagoClient, table: Mapping[str, Mapping[str, int]]) -> QuotaGate:
    settings = client.settings.replace(plan_limits=dict(table))
    return QuotaGate(settings, client, config=QuotaConfig(), clock=Clock().time)


@dataclass
class World:
    """An emulator with random features, plans and subscriptions, and what the model expects of each org."""

    fake: FakeLago
    plans: dict[str, str]  # org -> its plan
    features: dict[str, dict[str, str]]  # feature -> privilege -> value_type
    effective: dict[str, dict[str, dict[str, Any]]]  # org -> feature -> privilege -> the value set (override or plan)

    def expected(self, org: str, config: QuotaConfig) -> dict[str, int | None]:
        values = self.effective[org].get(config.feature_code, {})
        limits: dict[str, int | None] = {}
        for name in (config.calls_privilege, config.tokens_privilege):
            if name in values:
                read = reading(served(values[name], self.features[config.feature_code][name]))
                if read.kind == "limit":
                    limits[name] = read.value
        return limits


async def random_world(r: random.Random, client: LagoClient, fake: FakeLago, config: QuotaConfig) -> World:
    """Features ``api_quota`` (the limits, and privileges that are none), ``seats`` (a privilege named like a limit)
    and ``sso``; three plans with random values; four orgs, each on one of them, with random overrides (features of
    its plan or not) and removals made through the client, as an operator makes them."""
    names = [config.calls_privilege, config.tokens_privilege, "max", "root"]
    specs = [
        random_feature(r, config.feature_code, [n for n in names if r.random() < 0.85]),
        random_feature(r, "seats", [config.calls_privilege, "max"]),
        random_feature(r, "sso", ["provider"]),
    ]
    for spec in specs:
        fake.add_feature(spec["code"], privileges=spec["privileges"])
    features = {s["code"]: {p["code"]: p["value_type"] for p in s["privileges"]} for s in specs}
    plan_values: dict[str, dict[str, dict[str, Any]]] = {}
    for n in range(3):
        chosen = [s for s in specs if r.random() < 0.75]
        plan_values[f"plan_{n}"] = {s["code"]: random_values(r, s) for s in chosen}
        fake.add_plan(f"plan_{n}", entitlements=plan_values[f"plan_{n}"])
    plans: dict[str, str] = {}
    effective: dict[str, dict[str, dict[str, Any]]] = {}
    for n in range(4):
        org = f"org_{n}"
        plans[org] = r.choice(sorted(plan_values))
        fake.add_customer(org)
        fake.add_subscription(org, plans[org])
        values = {code: dict(given) for code, given in plan_values[plans[org]].items()}
        if r.random() < 0.6:  # overrides, partial: what is not named keeps the plan's value
            overrides = {s["code"]: random_values(r, s) for s in specs if r.random() < 0.6}
            overrides = {code: given for code, given in overrides.items() if given}
            if overrides:
                await client.update_subscription_entitlements(org, overrides)
                for code, given in overrides.items():
                    values.setdefault(code, {}).update(given)
        if r.random() < 0.3:  # a privilege, or the whole feature, taken away from this subscription only
            spec = r.choice(specs)
            privilege = r.choice(spec["privileges"])["code"] if r.random() < 0.6 else None
            if privilege is not None or spec["code"] in values:
                await client.remove_subscription_entitlement(org, spec["code"], privilege)
                if privilege is None:
                    values.pop(spec["code"], None)
                else:
                    values.get(spec["code"], {}).pop(privilege, None)
        effective[org] = values
    return World(fake, plans, features, effective)


async def check_world(seed: int) -> None:
    r = random.Random(seed)
    config = QuotaConfig()
    fake = FakeLago(api_key="k", clock=Clock().now)
    async with client_on(fake.transport()) as client:
        world = await random_world(r, client, fake, config)
        tables = [random_table(r, sorted(set(world.plans.values())), config) for _ in range(2)]
        for org in world.plans:
            expected = world.expected(org, config)
            read = await client.get_subscription_entitlements(org)
            assert limits_from_entitlements(read, config) == expected, (seed, org, read, world.effective[org])
            assert model_limits(read, config) == expected, (seed, org, read)  # (Lago's payload: the model agrees)
            embedded = (await client.get_subscription(org)).get("entitlements")
            assert limits_from_entitlements(embedded, config) == expected, (seed, org, embedded)
            async with client_on(KeyedPrivileges(fake)) as keyed:  # (as lago-api served them in mid-2025)
                read = await keyed.get_subscription_entitlements(org)
                assert limits_from_entitlements(read, config) == expected, (seed, org, read)
        for table in tables:
            gate = gate_on(client, table)
            try:
                for org, plan in world.plans.items():
                    got = await gate.get_org_plan_limits(org)
                    assert got == model_gate(plan, world.expected(org, config), table, config), (seed, org, table)
            finally:
                await gate.aclose()


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_plans_overrides_and_removals_give_the_documented_limits(seed: int) -> None:
    """Plans with random privilege values of every type, per-subscription overrides (which win over the plan's
    values, limit by limit) and removals, read back from the emulator through the client (the entitlements endpoint
    and those embedded in the subscription, the endpoint's also with privileges keyed by code) and through the gate
    with a random ``LAGO_PLAN_LIMITS``: the limits of the documented mapping."""
    await check_world(seed)


# ---------------------------------------------------------------------- Lago serving none, or none for the plan


class NoEntitlements(httpx.AsyncBaseTransport):
    """The emulator as a Lago whose subscriptions embed no entitlements and whose entitlements endpoint answers
    ``answer`` (status, JSON body, or ``None`` for a proxy's HTML page) instead."""

    def __init__(self, fake: FakeLago, answer: tuple[int, dict[str, Any] | None]) -> None:
        self.inner = fake.transport()
        self.answer = answer

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/entitlements"):
            status, body = self.answer
            if body is None:
                return httpx.Response(status, content=b"<html>Not Found</html>", headers={"content-type": "text/html"})
            return httpx.Response(status, json=body)
        response = await self.inner.handle_async_request(request)
        await response.aread()
        body = json.loads(response.content) if response.content else None
        if response.status_code != 200 or not isinstance(body, dict) or "subscription" not in body:
            return response
        body["subscription"].pop("entitlements", None)
        return httpx.Response(200, json=body)


FEATURE_UNAVAILABLE = (403, {"status": 403, "error": "Forbidden", "code": "feature_unavailable"})
ROUTE_UNKNOWN = (404, {"status": 404, "error": "Not Found", "code": "resource_not_found"})
UNAVAILABLE = (503, {"status": 503, "error": "Service Unavailable"})


def world_of_plans(seed: int) -> tuple[FakeLago, dict[str, dict[str, int]], dict[str, str]]:
    """Plans with ``api_quota`` limits (or none at all), an org on each, a random ``LAGO_PLAN_LIMITS``."""
    r = random.Random(seed)
    fake = FakeLago(api_key="k", clock=Clock().now)
    fake.add_feature("api_quota", privileges=[integer_privilege("max_api_calls"), integer_privilege("max_tokens")])
    plans: dict[str, str] = {}
    for n in range(4):
        given = {name: r.choice([3, 40, 500]) for name in ("max_api_calls", "max_tokens") if r.random() < 0.6}
        fake.add_plan(f"plan_{n}", entitlements={"api_quota": given} if given and n else None)
        fake.add_customer(f"org_{n}")
        fake.add_subscription(f"org_{n}", f"plan_{n}")
        plans[f"org_{n}"] = f"plan_{n}"
    return fake, random_table(r, sorted(plans.values()), QuotaConfig()), plans


@pytest.mark.parametrize("seed", SEEDS[:4])
@pytest.mark.parametrize("answer", [FEATURE_UNAVAILABLE, ROUTE_UNKNOWN], ids=["premium-only-403", "catch-all-404"])
async def test_a_lago_serving_no_entitlements_leaves_the_plan_limits_table_alone(
    seed: int, answer: tuple[int, dict[str, Any]]
) -> None:
    """A Lago without entitlements (no ``entitlements`` in the subscription, its endpoint a 404 or the free licence's
    403): the limits are the plan's ``LAGO_PLAN_LIMITS`` entry, whatever the plan's entitlements would have been."""
    fake, table, plans = world_of_plans(seed)
    config = QuotaConfig()
    async with client_on(NoEntitlements(fake, answer)) as client:
        gate = gate_on(client, table)
        try:
            for org, plan in plans.items():
                assert await gate.get_org_plan_limits(org) == model_gate(plan, {}, table, config), (seed, org, table)
        finally:
            await gate.aclose()


@pytest.mark.parametrize("seed", SEEDS[:4])
async def test_a_subscription_without_entitlements_has_the_plan_limits_table_alone(seed: int) -> None:
    """A Lago serving entitlements, a plan with none (or its feature removed for the subscription): ``[]``, and
    ``LAGO_PLAN_LIMITS``'s entry for the plan decides, read through the endpoint and embedded alike."""
    fake, table, plans = world_of_plans(seed)
    config = QuotaConfig()
    async with client_on(fake.transport()) as client:
        for org in plans:
            if await client.get_subscription_entitlements(org):
                await client.remove_subscription_entitlement(org, "api_quota")
            assert await client.get_subscription_entitlements(org) == []
            assert (await client.get_subscription(org))["entitlements"] == []
        gate = gate_on(client, table)
        try:
            for org, plan in plans.items():
                assert await gate.get_org_plan_limits(org) == model_gate(plan, {}, table, config), (seed, org, table)
        finally:
            await gate.aclose()


async def test_entitlements_lago_fails_to_read_are_an_error_not_the_plan_limits_table() -> None:
    """An entitlements read that fails (a 503) is not "this Lago has none": the org's limits are not read from
    ``LAGO_PLAN_LIMITS`` alone (its enterprise override lost), the read raises Lago's error."""
    fake, _, _ = world_of_plans(1)
    async with client_on(NoEntitlements(fake, UNAVAILABLE)) as client:
        gate = gate_on(client, {"plan_1": {"max_api_calls": 1}})
        try:
            with pytest.raises(LagoAPIError) as info:
                await gate.get_org_plan_limits("org_1")
            assert info.value.status == 503
        finally:
            await gate.aclose()


# ------------------------------------------------------------------------------------ what the seeds found, named


@pytest.mark.parametrize("value", ["0.5", "2.5", "99.99", 2.5, "1e-3"], ids=["0.5", "2.5", "99.99", "float", "1e-3"])
def test_a_fractional_privilege_value_is_ignored_not_cut_to_a_whole_number(
    value: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A privilege of a fraction (``"0.5"`` in a string privilege, the type Lago gives one made without
    ``value_type``) is no whole number: ignored and said, as "unlimited" or -1 are. It was cut to a whole number,
    silently: ``"0.5"`` a limit of 0 (every call of the org refused), ``"99.99"`` 99."""
    _limits._ignored_said.clear()  # (said once per process: not already by another test of this run)
    caplog.set_level(logging.WARNING, logger="lago_org_billing")
    entitlements = [{"code": "api_quota", "privileges": [{"code": "max_api_calls", "value": value}]}]
    assert limits_from_entitlements(entitlements, QuotaConfig()) == {}
    said = [r.getMessage() for r in caplog.records if "max_api_calls" in r.getMessage()]
    assert len(said) == 1 and "not a whole number" in said[0], said


async def test_a_fractional_string_privilege_leaves_the_plan_limits_entry_in_force() -> None:
    """Through Lago and the gate: a string privilege ``max_api_calls`` of ``"0.5"`` leaves the plan's
    ``LAGO_PLAN_LIMITS`` entry (3 calls) in force; it made the org's limit 0."""
    fake = FakeLago(api_key="k", clock=Clock().now)
    fake.add_feature("api_quota", privileges=[{"code": "max_api_calls", "value_type": "string"}])
    fake.add_plan("starter", entitlements={"api_quota": {"max_api_calls": "0.5"}})
    fake.add_customer("org_1")
    fake.add_subscription("org_1", "starter")
    async with client_on(fake.transport()) as client:
        gate = gate_on(client, {"starter": {"max_api_calls": 3}})
        try:
            limits = await gate.get_org_plan_limits("org_1")
            assert (limits["max_api_calls"], limits["source"]) == (3, "plan_limits")
            assert [(await gate.check("org_1")).allowed for _ in range(4)] == [True, True, True, False]
        finally:
            await gate.aclose()


class KeyedPrivileges(httpx.AsyncBaseTransport):
    """The emulator as lago-api served subscription entitlements in mid-2025 (its
    ``SubscriptionEntitlementCollectionSerializer``: ``privileges`` keyed by their codes, ``.index_by { it[:code] }``;
    its request spec read ``json[:entitlements].sole[:privileges][:max]``), before subscriptions embedded them."""

    def __init__(self, fake: FakeLago) -> None:
        self.inner = fake.transport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        await response.aread()
        body = json.loads(response.content) if response.content else None
        if response.status_code != 200 or not isinstance(body, dict):
            return response
        if isinstance(body.get("subscription"), dict):
            body["subscription"].pop("entitlements", None)
        for feature in body.get("entitlements") or []:
            feature["privileges"] = {privilege["code"]: privilege for privilege in feature["privileges"]}
        return httpx.Response(200, json=body)


async def test_privileges_keyed_by_their_codes_are_read() -> None:
    """A Lago answering ``privileges`` as an object keyed by code (lago-api in mid-2025) limits its orgs as the list
    does: they were all skipped, so every org was unlimited (the override of 2 calls, the plan's 5 alike), silently."""
    fake = FakeLago(api_key="k", clock=Clock().now)
    fake.add_feature("api_quota", privileges=[integer_privilege("max_api_calls"), integer_privilege("max_tokens")])
    fake.add_plan("starter", entitlements={"api_quota": {"max_api_calls": 5, "max_tokens": 1000}})
    for org in ("org_1", "org_2"):
        fake.add_customer(org)
        fake.add_subscription(org, "starter")
    async with client_on(fake.transport()) as client:
        await client.update_subscription_entitlements("org_2", {"api_quota": {"max_api_calls": 2}})
    async with client_on(KeyedPrivileges(fake)) as client:
        read = await client.get_subscription_entitlements("org_2")
        assert isinstance(read[0]["privileges"], dict)  # (the shape under test)
        gate = gate_on(client, {})
        try:
            for org, calls in (("org_1", 5), ("org_2", 2)):
                limits = await gate.get_org_plan_limits(org)
                assert limits == {
                    "plan_code": "starter",
                    "max_api_calls": calls,
                    "max_tokens": 1000,
                    "source": "entitlements",
                }
            assert [(await gate.check("org_2")).allowed for _ in range(3)] == [True, True, False]
        finally:
            await gate.aclose()
