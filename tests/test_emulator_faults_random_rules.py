"""Seeded, model-checked sequences against the emulator's fault-injection controls (``POST/GET/DELETE
/_emulator/faults``, ``fake.inject_fault`` / ``fake.clear_faults``), on a hand-driven clock.

What ``testing/_faults.py`` promises (its docstring, the contract's "Emulator test control", the README), which is
what every sequence is checked against by an independent model:

* **Answers.** A request whose path starts with a rule's ``path`` (default ``/api/v1``; never the ``/_emulator/``
  controls) meets the rule. Rules are tried in the order they were added: each one met adds its ``latency_ms``, and
  the first that answers ends the chain: ``status`` answers that status with Lago's error envelope for it (or the
  rule's ``body``), ``drop`` closes the connection (``httpx.RemoteProtocolError``, in process and over a socket), a
  ``rate_limit`` over its ``limit`` in the ``reset``-second window answers 429 with ``X-RateLimit-Limit/-Remaining/
  -Reset`` (seconds until the window resets). A request no rule answers gets the emulator's own answer, carrying the
  ``X-RateLimit-*`` of the last rate limit it met. No answer carries ``Retry-After`` (Lago documents none).
* **Lifetime.** ``count`` is used by each request that meets the rule, exactly once, also under concurrent
  requests; ``seconds`` lasts that long on the controller's clock; neither, until cleared. A request stopped by an
  earlier rule leaves the later rules' counts. ``GET`` lists the live rules in order (``remaining``, ``expires_in``).
* **Refusals.** A malformed rule (wrong types, bools for numbers, numbers out of range or too large for a float,
  unknown keys, a path without its leading slash or that can never match, a status that is no 4xx/5xx, ``count``
  with ``seconds``, a zero window, malformed ``rate_limit``, exclusive answers together, a body that is not JSON or is
  nested past what JSON decoding takes) is a 422 JSON naming the field (``FaultSpecError`` from Python), and nothing
  is added.

More seeds by hand: ``FAULT_SEEDS=0-2000 pytest tests/test_emulator_faults_random_rules.py``.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest

from lago_org_billing.testing import FakeLago, _faults
from lago_org_billing.testing._faults import FaultSpecError, install_faults
from lago_org_billing.testing._server import serve_in_thread

pytestmark = pytest.mark.anyio

API_KEY = "test-api-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
HUGE = 10**400  # a JSON integer no float holds

RATE_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
STATUSES = (400, 401, 403, 404, 405, 409, 413, 418, 422, 429, 499, 500, 502, 503, 504, 599)
RULE_PATHS = (
    "/api/v1",
    "/api/v1/",
    "/api/v1/events",
    "/api/v1/events/batch",
    "/api/v1/customers",
    "/api/v1/customers/acme",
    "/api/v1/plans",
    "/api",
    "/health",
    "/",
)
# (method, path, JSON body, authenticated): answers that never change the emulator's state.
REQUESTS: tuple[tuple[str, str, Any, bool], ...] = (
    ("GET", "/api/v1/plans", None, True),
    ("GET", "/api/v1/plans", None, False),
    ("GET", "/api/v1/customers/acme", None, True),
    ("GET", "/api/v1/customers/acme2", None, True),
    ("POST", "/api/v1/events", {}, True),
    ("POST", "/api/v1/events/batch", {}, True),
    ("GET", "/api/v1/events_batch", None, True),
    ("GET", "/api/v1x", None, True),
    ("GET", "/api", None, True),
    ("GET", "/health", None, False),
    ("GET", "/_emulator/state", None, False),
    ("GET", "/_emulator/webhooks", None, False),
)


def _seeds(default: list[int]) -> list[int]:
    raw = os.environ.get("FAULT_SEEDS")
    if not raw:
        return default
    first, _, last = raw.partition("-")
    return list(range(int(first), int(last or first) + 1))


class FakeClock:
    """A monotonic clock the sequence moves by hand."""

    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- the model


@dataclass
class ModelRule:
    """What the model knows of one added rule."""

    path: str
    status: int | None
    drop: bool
    latency_ms: float
    body: Any
    count: int | None
    remaining: int | None
    seconds: float | None
    expires_at: float | None
    limit: int | None = None
    reset: float | None = None
    window_start: float | None = None
    used: int = 0

    def live(self, now: float) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        return self.expires_at is None or now < self.expires_at

    def listed(self, now: float) -> dict[str, Any]:
        data: dict[str, Any] = {"path": self.path}
        if self.status is not None:
            data["status"] = self.status
        if self.count is not None:
            data["count"] = self.count
            data["remaining"] = self.remaining
        if self.seconds is not None:
            assert self.expires_at is not None
            data["seconds"] = self.seconds
            data["expires_in"] = pytest.approx(max(0.0, self.expires_at - now))
        if self.latency_ms:
            data["latency_ms"] = self.latency_ms
        if self.drop:
            data["drop"] = True
        if self.limit is not None:
            data["rate_limit"] = {"limit": self.limit, "reset": self.reset}
        if self.body is not None:
            data["body"] = self.body
        return data


@dataclass(frozen=True)
class Outcome:
    """One request's answer as the model predicts it and as observed (comparable, hashable)."""

    kind: str  # "pass", "status", "429", "drop"
    status: int
    body: str  # canonical JSON ("" for a drop)
    rate: tuple[str, str, str] | None


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


class Model:
    """The documented semantics of the fault rules, kept apart from the code under test."""

    def __init__(self, clock: FakeClock, baseline: dict[tuple[str, str, bool], tuple[int, str]]) -> None:
        self.clock = clock
        self.baseline = baseline
        self.rules: list[ModelRule] = []

    def add(self, spec: dict[str, Any]) -> None:
        now = self.clock.now
        rate = spec.get("rate_limit")
        count = spec.get("count")
        seconds = spec.get("seconds")
        self.rules.append(
            ModelRule(
                path=spec.get("path", "/api/v1"),
                status=spec.get("status"),
                drop=spec.get("drop") is True,
                latency_ms=float(spec.get("latency_ms") or 0),
                body=spec.get("body"),
                count=count,
                remaining=count,
                seconds=seconds,
                expires_at=None if seconds is None else now + seconds,
                limit=None if rate is None else rate["limit"],
                reset=None if rate is None else float(rate["reset"]),
            )
        )

    def listing(self) -> list[dict[str, Any]]:
        now = self.clock.now
        self.rules = [rule for rule in self.rules if rule.live(now)]
        return [rule.listed(now) for rule in self.rules]

    def request(self, method: str, path: str, auth: bool) -> tuple[Outcome, list[float]]:
        now = self.clock.now
        self.rules = [rule for rule in self.rules if rule.live(now)]
        sleeps: list[float] = []
        rate: tuple[str, str, str] | None = None
        if not path.startswith("/_emulator/"):
            for rule in self.rules:
                # (a prefix ending with "/" names a whole segment: the path without that slash too)
                if not (path + "/" if rule.path.endswith("/") else path).startswith(rule.path):
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                if rule.latency_ms:
                    sleeps.append(rule.latency_ms / 1000)
                if rule.status is not None:
                    body = rule.body if rule.body is not None else None
                    return Outcome("status", rule.status, "" if body is None else canonical(body), None), sleeps
                if rule.drop:
                    return Outcome("drop", 0, "", None), sleeps
                if rule.limit is not None:
                    assert rule.reset is not None
                    if rule.window_start is None or now - rule.window_start >= rule.reset:
                        rule.window_start, rule.used = now, 0
                    rule.used += 1
                    reset_in = math.ceil(rule.window_start + rule.reset - now)
                    rate = (str(rule.limit), str(max(0, rule.limit - rule.used)), str(reset_in))
                    if rule.used > rule.limit:
                        return Outcome("429", 429, canonical(LAGO_429), rate), sleeps
        status, body = self.baseline[(method, path, auth)]
        return Outcome("pass", status, body, rate), sleeps


LAGO_429 = {"status": 429, "error": "Too Many Requests", "code": "too_many_requests"}


def check_lago_error(status: int, body: Any) -> None:
    """Lago's error envelope for ``status`` (lago-api.md section 1), or the generic ``{status, error}`` shape."""
    assert isinstance(body, dict) and body["status"] == status, body
    if status == 500:
        assert set(body) == {"status", "errors", "data"} and body["data"] == {}
        assert isinstance(body["errors"], list) and isinstance(body["errors"][0]["message"], str)
        return
    fixed: dict[int, dict[str, Any]] = {
        401: {"status": 401, "error": "Unauthorized"},
        404: {"status": 404, "error": "Not Found", "code": "resource_not_found"},
        422: {"status": 422, "error": "Unprocessable Entity", "code": "validation_errors", "error_details": {}},
        429: LAGO_429,
    }
    if status in fixed:
        assert body == fixed[status]
        return
    assert isinstance(body.get("error"), str) and body["error"]
    if status == 400:
        assert body["error"].startswith("BadRequest: ") and set(body) == {"status", "error"}
    elif status in (403, 405):
        assert body["error"] == {403: "Forbidden", 405: "Method Not Allowed"}[status]
        assert set(body) == {"status", "error", "code"} and isinstance(body["code"], str)
    else:
        assert set(body) == {"status", "error"}


# --------------------------------------------------------------------------- rules: valid and malformed


@dataclass
class Spec:
    """A rule to add: ``payload`` (JSON) or ``raw`` bytes; ``fields`` named by the refusal, ``None`` when valid."""

    payload: Any = None
    raw: bytes | None = None
    fields: tuple[str, ...] | None = None

    def content(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(self.payload).encode()  # (NaN and Infinity written as Python's json reads them)


def valid_spec(rng: random.Random, kind: str | None = None) -> dict[str, Any]:
    kind = kind or rng.choice(["status", "status", "drop", "rate", "latency"])
    spec: dict[str, Any] = {}
    if kind == "status":
        spec["status"] = rng.choice(STATUSES)
        if rng.random() < 0.2:
            spec["body"] = rng.choice([{"status": spec["status"], "error": "custom"}, "plain", [1, 2], 0, False])
    elif kind == "drop":
        spec["drop"] = True
    elif kind == "rate":
        spec["rate_limit"] = {"limit": rng.choice([0, 1, 2, 3]), "reset": rng.choice([0.5, 1, 5, 10, 30])}
    if kind == "latency":
        spec["latency_ms"] = rng.choice([1, 250, 1000.5])
    elif rng.random() < 0.3:
        spec["latency_ms"] = rng.choice([0, 5, 100])
    duration = rng.choice(["count", "count", "seconds", "none"])
    if duration == "count":
        spec["count"] = rng.choice([1, 1, 2, 3, 5, 10**30])
    elif duration == "seconds":
        spec["seconds"] = rng.choice([0.5, 1, 5, 30, 1e9])
    if rng.random() < 0.8:
        spec["path"] = rng.choice(RULE_PATHS)
    for key in ("count", "seconds", "body", "rate_limit", "latency_ms", "status"):
        if key not in spec and rng.random() < 0.05:
            spec[key] = None  # null reads as absent
    if kind != "drop" and rng.random() < 0.1:
        spec["drop"] = False
    return spec


BAD_VALUES: dict[str, list[Any]] = {
    "status": ["503", True, False, 503.0, 200, 302, 399, 600, 100, -1, 0, HUGE, [503], {"code": 503}],
    "count": [0, -1, 1.5, 2.0, True, "2", HUGE, [1], math.inf],
    "seconds": [-1, -0.5, "5", True, HUGE, 0, 0.0, math.nan, math.inf, {}],
    "latency_ms": [-5, "10", True, HUGE, math.inf, math.nan, [1]],
    "drop": ["yes", 1, 0, None, "true"],
    "path": [
        "api/v1",
        "",
        5,
        None,
        ["/"],
        "/api/v1/plans?per_page=1",
        "/api/v1#top",
        "/_emulator/state",
        "/_emulator/",
        "*",
        " /api/v1",
    ],
}
BAD_RATE_LIMITS: list[tuple[Any, str]] = [
    (5, "rate_limit"),
    ([], "rate_limit"),
    ("10/s", "rate_limit"),
    (True, "rate_limit"),
    ({}, "rate_limit"),
    ({"limit": 1}, "rate_limit"),
    ({"reset": 1}, "rate_limit"),
    ({"limit": None, "reset": 1}, "rate_limit"),
    ({"limit": 1, "reset": 1, "burst": 2}, "rate_limit"),
    ({"limit": 1, "reset": 0}, "reset"),
    ({"limit": -1, "reset": 1}, "limit"),
    ({"limit": 1.5, "reset": 1}, "limit"),
    ({"limit": True, "reset": 1}, "limit"),
    ({"limit": 1, "reset": -1}, "reset"),
    ({"limit": 1, "reset": "1"}, "reset"),
    ({"limit": HUGE, "reset": 1}, "limit"),
    ({"limit": 1, "reset": HUGE}, "reset"),
    ({"limit": 1, "reset": math.inf}, "reset"),
]
NOTHING = ("status", "drop", "latency_ms", "rate_limit")
EXCLUSIVE = ("status", "drop", "rate_limit")


def invalid_spec(rng: random.Random) -> Spec:
    """A malformed rule with one thing wrong, and the field(s) its refusal must name."""
    what = rng.choice(
        ["value"] * 6 + ["rate_limit"] * 2 + ["unknown", "exclusive", "both", "nothing", "body", "shape", "raw"]
    )
    if what == "value":
        key = rng.choice(list(BAD_VALUES))
        kind = {"status": "status", "drop": rng.choice(["status", "rate", "latency"])}.get(key)
        spec = valid_spec(rng, kind)
        if key in ("count", "seconds"):
            spec.pop("count", None)
            spec.pop("seconds", None)
        spec[key] = rng.choice(BAD_VALUES[key])
        return Spec(spec, fields=(key,))
    if what == "rate_limit":
        spec = valid_spec(rng, rng.choice(["rate", "latency"]))
        spec["rate_limit"], field = rng.choice(BAD_RATE_LIMITS)
        return Spec(spec, fields=(field,))
    if what == "unknown":
        spec = valid_spec(rng)
        key = rng.choice(["colour", "Status", "retry_after", "paths", ""])
        spec[key] = 1
        return Spec(spec, fields=(key,))
    if what == "exclusive":
        spec = valid_spec(rng, "latency")
        answers = rng.choice([("status", "drop"), ("status", "rate_limit"), ("drop", "rate_limit"), EXCLUSIVE])
        values = {"status": 503, "drop": True, "rate_limit": {"limit": 1, "reset": 1}}
        spec.update({key: values[key] for key in answers})
        return Spec(spec, fields=EXCLUSIVE)
    if what == "both":
        spec = valid_spec(rng)
        spec.update(count=rng.choice([1, 3]), seconds=rng.choice([1, 2.5]))
        return Spec(spec, fields=("count", "seconds"))
    if what == "nothing":
        spec = rng.choice([{}, {"count": 2}, {"path": "/api/v1"}, {"latency_ms": 0}, {"drop": False}, {"status": None}])
        return Spec(dict(spec), fields=NOTHING)
    if what == "body":
        spec = valid_spec(rng, rng.choice(["drop", "rate", "latency"]))
        spec["body"] = rng.choice([{"a": 1}, "x", 0])
        return Spec(spec, fields=("body",))
    if what == "shape":
        return Spec(rng.choice([[], [1, 2], "status", 503, None, True]), fields=("JSON",))
    raw, fields = rng.choice(
        [
            (b"status=503", ("JSON",)),
            (b"{", ("JSON",)),
            (b"", ("JSON",)),
            (b"\xff\xfe", ("JSON",)),
            (b"[" * 100_000, ()),
            (b'{"status": 503, "body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ()),
            (b'{"status": 503, "count": 1' + b"0" * 400 + b"}", ("count",)),
            (b'{"status": 503, "count": 1' + b"0" * 5000 + b"}", ("JSON",)),
        ]
    )
    return Spec(raw=raw, fields=fields)


def check_refusal(response: httpx.Response, fields: tuple[str, ...]) -> None:
    assert response.status_code == 422, (response.status_code, response.text[:200])
    body = response.json()
    assert set(body) == {"status", "error", "code", "message"}
    assert body["status"] == 422 and body["error"] == "Unprocessable Entity" and body["code"] == "invalid_fault"
    message = body["message"]
    assert isinstance(message, str) and len(message) < 2000, message[:300]
    for field in fields:
        assert (f"'{field}'" if field != "JSON" else "JSON") in message, (fields, message)


def python_kwargs(spec: Spec) -> dict[str, Any] | None:
    """The ``fake.inject_fault(...)`` call for a spec, when it has one."""
    allowed = {"status", "count", "seconds", "path", "latency_ms", "drop", "rate_limit", "body"}
    if spec.raw is not None or not isinstance(spec.payload, dict) or not set(spec.payload) <= allowed:
        return None
    return dict(spec.payload)


# --------------------------------------------------------------------------- the sequence runner


async def observe(client: httpx.AsyncClient, method: str, path: str, body: Any, auth: bool) -> Outcome:
    headers = AUTH if auth else {"Authorization": ""}
    try:
        response = await client.request(method, path, json=body, headers=headers)
    except httpx.RemoteProtocolError:
        return Outcome("drop", 0, "", None)
    assert "retry-after" not in response.headers
    present = [name in response.headers for name in RATE_HEADERS]
    assert all(present) or not any(present), response.headers
    rate = tuple(response.headers[name] for name in RATE_HEADERS) if all(present) else None
    return Outcome("?", response.status_code, response.text, rate)  # type: ignore[arg-type]


def matches(expected: Outcome, seen: Outcome) -> bool:
    """Whether an observed answer is the predicted one (an error envelope checked for its status's shape)."""
    if expected.kind == "drop" or seen.kind == "drop":
        return expected.kind == seen.kind
    if (expected.status, expected.rate) != (seen.status, seen.rate):
        return False
    if expected.kind == "status" and expected.body == "":
        try:
            check_lago_error(expected.status, json.loads(seen.body))
        except AssertionError:
            return False
        return True
    return canonical(json.loads(seen.body)) == expected.body


def shape(outcome: Outcome) -> tuple[Any, ...]:
    return (outcome.kind == "drop", outcome.status, outcome.rate)


async def baseline_of(client: httpx.AsyncClient) -> dict[tuple[str, str, bool], tuple[int, str]]:
    answers = {}
    for method, path, body, auth in REQUESTS:
        seen = await observe(client, method, path, body, auth)
        answers[(method, path, auth)] = (seen.status, canonical(json.loads(seen.body)))
    return answers


async def run_sequence(
    seed: int,
    fake: FakeLago,
    client: httpx.AsyncClient,
    clock: FakeClock,
    slept: list[float],
    steps: int,
    *,
    in_process: bool,
) -> None:
    rng = random.Random(seed)
    model = Model(clock, await baseline_of(client))
    controller = fake.faults
    trail: list[str] = []

    async def check_listing() -> None:
        listed = (await client.get("/_emulator/faults")).json()
        assert listed == {"faults": model.listing()}, trail[-8:]
        assert [rule.to_json(clock.now) for rule in controller.rules] == model.listing(), trail[-8:]

    for _ in range(steps):
        roll = rng.random()
        if roll < 0.30:
            spec = invalid_spec(rng) if rng.random() < 0.45 else Spec(valid_spec(rng))
            kwargs = python_kwargs(spec)
            if kwargs is not None and rng.random() < 0.25:
                trail.append(f"inject_fault({kwargs!r:.200})")
                if spec.fields is None:
                    fake.inject_fault(**kwargs)  # type: ignore[attr-defined]
                    model.add(spec.payload)
                else:
                    with pytest.raises(FaultSpecError) as caught:
                        fake.inject_fault(**kwargs)  # type: ignore[attr-defined]
                    for field in spec.fields:
                        assert (f"'{field}'" if field != "JSON" else "JSON") in str(caught.value), (field, caught)
            else:
                trail.append(f"POST {spec.content()[:200]!r}")
                response = await client.post(
                    "/_emulator/faults", content=spec.content(), headers={"Content-Type": "application/json"}
                )
                if spec.fields is None and spec.raw is None:
                    assert response.status_code == 201, (response.text[:300], trail[-8:])
                    model.add(spec.payload)
                    assert response.json() == {"fault": model.rules[-1].listed(clock.now)}
                else:
                    assert spec.fields is not None
                    check_refusal(response, spec.fields)
            await check_listing()
        elif roll < 0.72:
            method, path, body, auth = rng.choice(REQUESTS)
            trail.append(f"{method} {path} auth={auth}")
            slept.clear()
            expected, sleeps = model.request(method, path, auth)
            seen = await observe(client, method, path, body, auth)
            assert matches(expected, seen), (expected, seen, trail[-8:])
            assert slept == sleeps, trail[-8:]
            if in_process and path.startswith("/api/v1"):  # (served, the log is written after the answer is sent)
                record = fake.requests[-1]
                assert (record.method, record.path, record.status) == (method, path, seen.status), trail[-8:]
        elif roll < 0.80:
            method, path, body, auth = rng.choice(REQUESTS)
            burst = rng.randint(2, 6)
            trail.append(f"{burst} x {method} {path} at once")
            slept.clear()
            predicted = [model.request(method, path, auth) for _ in range(burst)]
            seen_all: list[Outcome] = []

            async def one() -> None:
                seen_all.append(await observe(client, method, path, body, auth))  # noqa: B023

            async with anyio.create_task_group() as group:
                for _ in range(burst):
                    group.start_soon(one)
            assert Counter(map(shape, seen_all)) == Counter(shape(e) for e, _ in predicted), trail[-8:]
            assert sorted(slept) == sorted(s for _, sleeps in predicted for s in sleeps), trail[-8:]
        elif roll < 0.86:
            trail.append("GET faults")
            await check_listing()
        elif roll < 0.90:
            if rng.random() < 0.5:
                trail.append("DELETE faults")
                assert (await client.delete("/_emulator/faults")).json() == {"faults": []}
            else:
                trail.append("clear_faults()")
                fake.clear_faults()  # type: ignore[attr-defined]
            model.rules.clear()
            await check_listing()
        else:
            delta = rng.choice([0.25, 0.5, 1, 1, 4.5, 5, 10, 29.75, 30, 100])
            trail.append(f"clock += {delta}")
            clock.now += delta
    await check_listing()


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The latencies the fault middleware waited, recorded instead of waited."""
    record: list[float] = []

    async def sleep(seconds: float) -> None:
        record.append(seconds)

    monkeypatch.setattr(_faults, "_sleep", sleep)
    return record


def make_fake(clock: FakeClock) -> FakeLago:
    fake = FakeLago(api_key=API_KEY)
    install_faults(fake, clock=clock)
    fake.add_customer(external_id="acme")
    return fake


@pytest.mark.parametrize("seed", _seeds([0, 1, 2, 3, 4, 5]))
async def test_random_rules_in_process(seed: int, slept: list[float]) -> None:
    """Seeded sequences of valid and malformed rules, requests, bursts, listings, clears and clock moves, in process:
    every answer, latency, count, expiry and refusal is the model's."""
    clock = FakeClock()
    fake = make_fake(clock)
    async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url) as client:
        await run_sequence(seed, fake, client, clock, slept, steps=120, in_process=True)


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeLago, FakeClock, str]]:
    """A FakeLago on a hand-driven fault clock, served by uvicorn on 127.0.0.1."""
    clock = FakeClock()
    fake = make_fake(clock)
    with serve_in_thread(fake) as url:
        yield fake, clock, url


@pytest.mark.parametrize("seed", _seeds([100, 101]))
async def test_random_rules_over_a_socket(
    seed: int, slept: list[float], served: tuple[FakeLago, FakeClock, str]
) -> None:
    """The same sequences against the emulator served over HTTP: a ``drop`` closes the connection (the client sees
    ``RemoteProtocolError``, its next request is answered), concurrent requests share no ``count``."""
    fake, clock, url = served
    async with httpx.AsyncClient(base_url=url) as client:
        await run_sequence(seed, fake, client, clock, slept, steps=60, in_process=False)


# --------------------------------------------------------------------------- the defects the sequences found


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client of a fresh emulator."""
    async with make_fake(FakeClock()).client() as client:
        yield client


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"status": 503, "count": 1' + b"0" * 400 + b"}", "count"),
        (b'{"status": 1' + b"0" * 400 + b"}", "status"),
        (b'{"status": 503, "seconds": 1' + b"0" * 400 + b"}", "seconds"),
        (b'{"latency_ms": 1' + b"0" * 400 + b"}", "latency_ms"),
        (b'{"rate_limit": {"limit": 1' + b"0" * 400 + b', "reset": 1}}', "limit"),
    ],
)
async def test_a_number_too_large_for_a_float_is_refused(client: httpx.AsyncClient, raw: bytes, field: str) -> None:
    """A JSON integer past a float's range is a 422 naming the field (it raised ``OverflowError`` out of the control
    route: a 500 served, the exception itself in process)."""
    check_refusal(await client.post("/_emulator/faults", content=raw), (field,))
    assert (await client.get("/_emulator/faults")).json() == {"faults": []}


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000, b'{"status": 503, "body": ' + b"[" * 990 + b"]" * 990 + b"}"],
)
async def test_json_nested_too_deep_is_refused(client: httpx.AsyncClient, raw: bytes) -> None:
    """A body nested deeper than JSON decoding (or the rule's ``body`` check) takes is a 422, not ``RecursionError``."""
    try:
        json.dumps(json.loads(raw))
    except (RecursionError, ValueError):
        pass
    else:  # (Python 3.13 reads and writes 990 levels: no such body there)
        pytest.skip("this Python decodes and encodes this body")
    response = await client.post("/_emulator/faults", content=raw)
    assert response.status_code == 422 and response.json()["code"] == "invalid_fault"
    assert (await client.get("/_emulator/faults")).json() == {"faults": []}


def test_a_python_body_nested_too_deep_is_refused() -> None:
    """``inject_fault(status=503, body=...)`` with a body nested past what ``json`` encodes is a ``FaultSpecError``
    naming ``body``, not a ``RecursionError``."""
    body: list[Any] = []
    for _ in range(100_000):
        body = [body]
    fake = make_fake(FakeClock())
    with pytest.raises(FaultSpecError, match="'body'"):
        fake.inject_fault(status=503, body=body)  # type: ignore[attr-defined]
    assert fake.faults.rules == []


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"status": 503, "seconds": 0}, "seconds"),
        ({"status": 503, "path": "/api/v1/plans?per_page=1"}, "path"),
        ({"status": 503, "path": "/api/v1/plans#top"}, "path"),
        ({"status": 503, "path": "/_emulator/state"}, "path"),
    ],
)
async def test_a_rule_that_could_never_apply_is_refused(
    client: httpx.AsyncClient, spec: dict[str, Any], field: str
) -> None:
    """A zero-second window (expired when added), a path with a query or fragment (matched against the request's path
    alone) and a path under the never-faulted ``/_emulator/`` were accepted with 201 and then never applied; like
    ``"reset": 0`` they are refused at once, over HTTP and from Python."""
    check_refusal(await client.post("/_emulator/faults", json=spec), (field,))
    assert (await client.get("/_emulator/faults")).json() == {"faults": []}
    fake = make_fake(FakeClock())
    with pytest.raises(FaultSpecError, match=field):
        fake.inject_fault(**spec)  # type: ignore[attr-defined]
