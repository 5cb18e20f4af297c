"""The Lago emulator checks what its seeding helpers and test controls are given: invoice, wallet and credit note
amounts of the wrong type are Lago's 422 naming the field (they raised ValueError/TypeError/OverflowError, or were
stored and broke a later answer), ``seed()`` names the entry it refuses, the ``/_emulator/faults`` and
``/_emulator/webhooks`` controls refuse a body holding a lone surrogate (or nested too deep) with their usual 422, and
``reset()`` / clearing the faults ends an injected latency in flight (a served emulator then stops at once, quietly).
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from lago_org_billing.testing import FakeLago, FakeLagoError, _faults
from lago_org_billing.testing._server import serve_in_thread

pytestmark = pytest.mark.anyio

API_KEY = "test-api-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MARCH = datetime(2026, 3, 1, tzinfo=timezone.utc)


def invalid(**fields: str) -> dict[str, Any]:
    """Lago's 422 body naming each field with its error code."""
    return {
        "status": 422,
        "error": "Unprocessable Entity",
        "code": "validation_errors",
        "error_details": {field: [code] for field, code in fields.items()},
    }


def counts(fake: FakeLago) -> tuple[int, ...]:
    store = fake.store
    return (len(fake.customers), len(store.invoices), len(store.wallets), len(store.credit_notes))


# ------------------------------------------------------------------------- amounts of invoices, wallets, notes

#: (helper, field, value) the helpers refused with a Python exception (or stored, to break a later answer)
REFUSED_AMOUNTS: list[tuple[str, str, Any]] = [
    ("add_invoice", "total_amount_cents", "ten"),
    ("add_invoice", "fees_amount_cents", 1e400),
    ("add_invoice", "total_amount_cents", [1]),
    ("add_invoice", "total_amount_cents", True),
    ("add_invoice", "total_amount_cents", 10.5),
    ("add_invoice", "taxes_amount_cents", "1.5"),
    ("add_invoice", "total_amount_cents", 10**5000),
    ("add_invoice", "total_paid_amount_cents", 2**63),
    ("add_invoice", "total_due_amount_cents", {"a": 1}),
    ("add_wallet", "balance_cents", [1]),
    ("add_wallet", "balance_cents", "ten"),
    ("add_wallet", "balance_cents", float("inf")),
    ("add_wallet", "credits_balance", 1e400),
    ("add_wallet", "credits_balance", "abc"),
    ("add_wallet", "credits_balance", "NaN"),
    ("add_wallet", "credits_balance", "1e400"),
    ("add_wallet", "credits_balance", True),
    ("add_wallet", "credits_balance", [1]),
    ("add_wallet", "priority", "high"),
    ("add_wallet", "priority", 0),
    ("add_wallet", "priority", 51),
    ("add_credit_note", "credit_amount_cents", "ten"),
    ("add_credit_note", "refund_amount_cents", 1e400),
    ("add_credit_note", "offset_amount_cents", [1]),
    ("add_credit_note", "balance_amount_cents", "ten"),
    ("add_credit_note", "balance_amount_cents", float("inf")),
    ("add_credit_note", "total_amount_cents", 2.5),
    ("add_applied_coupon", "amount_cents", "ten"),
    ("add_applied_coupon", "amount_cents_remaining", [1]),
    ("add_applied_coupon", "frequency_duration_remaining", "two"),
    ("add_applied_coupon", "percentage_rate", "abc"),
    # what the emulator sorts or indexes (a number among the dates broke the listings), and NaN or Infinity anywhere
    ("add_invoice", "issuing_date", 20260301),
    ("add_invoice", "lago_id", [1]),
    ("add_invoice", "metadata", "key=value"),
    ("add_invoice", "credits", 5),
    ("add_invoice", "payment_overdue", float("nan")),
    ("add_wallet", "created_at", 7.0),
    ("add_wallet", "name", float("-inf")),
    ("add_credit_note", "created_at", 1),
    ("add_credit_note", "items", [{"amount_cents": float("nan")}]),
    ("add_applied_coupon", "created_at", ["2026-03-01"]),
]


def label(value: Any) -> str:
    """A short test id for a value (an int of 5000 digits has no ``str``)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"int of {value.bit_length()} bits"
    return repr(value)[:12]


def call_helper(fake: FakeLago, helper: str, fields: dict[str, Any]) -> Any:
    if helper == "add_credit_note":
        return fake.add_credit_note(fake.store.invoices[0]["lago_id"], **fields)
    if helper == "add_applied_coupon":
        return fake.add_applied_coupon("new_customer", "welcome", **{"amount_cents": 100, **fields})
    return getattr(fake, helper)("new_customer", **fields)


def fake_with_an_invoice() -> FakeLago:
    fake = FakeLago(api_key=API_KEY, clock=lambda: MARCH)
    fake.add_invoice("acme", total_amount_cents=1000)
    return fake


@pytest.mark.parametrize(
    ("helper", "field", "value"), REFUSED_AMOUNTS, ids=[f"{h}-{f}-{label(v)}" for h, f, v in REFUSED_AMOUNTS]
)
async def test_an_amount_of_the_wrong_type_is_lagos_422_naming_the_field(helper: str, field: str, value: Any) -> None:
    """An amount that is no integer (or no finite decimal, for credits) is a FakeLagoError with Lago's 422
    ``value_is_invalid`` naming the field; nothing is stored, and the emulator still answers its listings."""
    fake = fake_with_an_invoice()
    before = counts(fake)
    with pytest.raises(FakeLagoError) as caught:
        call_helper(fake, helper, {field: value})
    assert (caught.value.status, caught.value.body) == (422, invalid(**{field: "value_is_invalid"}))
    assert field in str(caught.value)
    assert counts(fake) == before
    async with fake.client() as client:
        for path in ("/api/v1/invoices", "/api/v1/credit_notes", "/api/v1/wallets?external_customer_id=acme"):
            assert (await client.get(path)).status_code == 200


#: (helper, fields given, what the answer holds) amounts written as Lago's integers, numbers or numeric text
ACCEPTED_AMOUNTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("add_invoice", {"total_amount_cents": "1000"}, {"total_amount_cents": 1000, "total_due_amount_cents": 1000}),
    ("add_invoice", {"fees_amount_cents": 250.0}, {"fees_amount_cents": 250, "total_amount_cents": 250}),
    ("add_invoice", {"total_amount_cents": None}, {"total_amount_cents": 0}),
    ("add_invoice", {"total_amount_cents": 2**63 - 1}, {"total_amount_cents": 2**63 - 1}),
    ("add_wallet", {"balance_cents": "1234"}, {"balance_cents": 1234, "credits_balance": "12.34"}),
    ("add_wallet", {"credits_balance": 25}, {"balance_cents": 2500, "credits_balance": "25.0"}),
    ("add_wallet", {"credits_balance": "2.5", "priority": 7}, {"balance_cents": 250, "priority": 7}),
    ("add_wallet", {"credits_balance": None}, {"balance_cents": 0, "credits_balance": "0.0"}),
    ("add_credit_note", {"credit_amount_cents": "900"}, {"credit_amount_cents": 900, "balance_amount_cents": 900}),
    ("add_applied_coupon", {"frequency": "once", "amount_cents": "300"}, {"amount_cents_remaining": 300}),
    ("add_invoice", {"issuing_date": None, "sequential_id": "7"}, {"issuing_date": "2026-03-01", "sequential_id": 7}),
]


@pytest.mark.parametrize(("helper", "fields", "answered"), ACCEPTED_AMOUNTS)
def test_an_amount_written_as_a_number_or_numeric_text_is_stored_as_lagos_integer(
    helper: str, fields: dict[str, Any], answered: dict[str, Any]
) -> None:
    """Amounts given as integral numbers or integer text are accepted and answered as the integers Lago serves."""
    fake = fake_with_an_invoice()
    created = call_helper(fake, helper, fields)
    assert {key: created[key] for key in answered} == answered
    json.dumps(created, allow_nan=False)


#: Wallet top-up rules that are not a list of rule objects
REFUSED_RULES: list[Any] = ["monthly", [1], ["interval"], {"trigger": "interval"}, [None], 5]


@pytest.mark.parametrize("rules", REFUSED_RULES, ids=[repr(r)[:20] for r in REFUSED_RULES])
def test_wallet_top_up_rules_that_are_no_list_of_objects_are_lagos_invalid_recurring_rule(rules: Any) -> None:
    """``recurring_transaction_rules`` must be a list of rule objects: otherwise Lago's 422 ``invalid_recurring_rule``
    (lago-api ``Wallets::ValidateRecurringTransactionRulesService``), not a ValueError or TypeError."""
    fake = fake_with_an_invoice()
    before = counts(fake)
    with pytest.raises(FakeLagoError) as caught:
        fake.add_wallet("new_customer", recurring_transaction_rules=rules)
    assert caught.value.body == invalid(recurring_transaction_rules="invalid_recurring_rule")
    assert counts(fake) == before


#: (helper, fields) that were stored and broke the customer's next subscription invoice with a ValueError or TypeError
#: (a 500 over HTTP): a wallet priority out of lago-api ``Wallet``'s 1..50, coupon integers that are words or lists
BREAKING_BILLING: list[tuple[str, dict[str, Any]]] = [
    ("add_wallet", {"credits_balance": "5.0", "priority": "high"}),
    ("add_applied_coupon", {"amount_cents": "ten"}),
    ("add_applied_coupon", {"amount_cents": [1]}),
    ("add_applied_coupon", {"amount_cents": 100, "frequency": "once", "amount_cents_remaining": "x"}),
    ("add_applied_coupon", {"amount_cents": 100, "frequency": "recurring", "frequency_duration": "two"}),
]


@pytest.mark.parametrize(("helper", "fields"), BREAKING_BILLING)
async def test_a_seeded_value_that_broke_billing_is_refused_and_the_next_invoice_is_made(
    helper: str, fields: dict[str, Any]
) -> None:
    """A wallet or coupon value billing cannot read is refused when seeded, not stored to make the customer's next
    subscription a 500; the subscription then starts, its invoice consuming the wallet or coupon that is accepted."""
    fake = FakeLago(api_key=API_KEY, clock=lambda: MARCH)
    fake.add_plan("pro", amount_cents=1000, pay_in_advance=True)
    fake.add_customer("acme", currency="USD")
    add = getattr(fake, helper)
    args = ("acme", "welcome") if helper == "add_applied_coupon" else ("acme",)
    with pytest.raises(FakeLagoError) as caught:
        add(*args, **fields)
    assert caught.value.status == 422
    accepted = {"credits_balance": "5.0"} if helper == "add_wallet" else {"amount_cents": 300}
    add(*args, **accepted)
    async with fake.client() as client:
        answer = await client.post(
            "/api/v1/subscriptions",
            json={"subscription": {"external_customer_id": "acme", "plan_code": "pro", "external_id": "sub"}},
        )
        assert answer.status_code == 200, answer.text
    [invoice] = fake.invoices
    taken = invoice["prepaid_credit_amount_cents"] + invoice["coupons_amount_cents"]
    assert (taken, invoice["total_amount_cents"]) == (500 if helper == "add_wallet" else 300, 1000 - taken)


# ---------------------------------------------------------------------------------------- seed() names the entry

#: (seed key, a good entry, a bad entry, what the error says of the bad one)
SEED_ENTRIES: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "billable_metrics": ({"code": "m{n}"}, {"code": "m{n}", "aggregation_type": "nope"}, "aggregation_type"),
    "plans": ({"code": "p{n}"}, {"code": "p{n}", "amount_cents": "ten"}, "amount_cents"),
    "customers": ({"external_id": "c{n}"}, {"external_id": "c{n}", "currency": "XXX"}, "currency"),
    "invoices": (
        {"external_customer_id": "c{n}", "total_amount_cents": 5},
        {"external_customer_id": "c{n}", "total_amount_cents": "ten"},
        "total_amount_cents",
    ),
    "wallets": (
        {"external_customer_id": "w{n}", "credits_balance": "1"},
        {"external_customer_id": "w{n}", "recurring_transaction_rules": "monthly"},
        "recurring_transaction_rules",
    ),
    "applied_coupons": (
        {"external_customer_id": "c{n}", "coupon_code": "k{n}", "amount_cents": 5},
        {"external_customer_id": "c{n}"},
        "coupon_code",
    ),
}


def entry(template: dict[str, Any], n: int) -> dict[str, Any]:
    return {k: v.format(n=n) if isinstance(v, str) else v for k, v in template.items()}


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_seed_names_the_entry_it_refuses(seed: int) -> None:
    """``seed()`` raising for one entry names it as ``key[index]`` (keeping Lago's status and body), so that a seed
    file's author knows which entry to mend; through ``from_seed_file`` after the file's name."""
    rng = random.Random(seed)
    key = rng.choice(sorted(SEED_ENTRIES))
    good, bad, said = SEED_ENTRIES[key]
    index = rng.randrange(4)
    items = [entry(good, n) for n in range(index)] + [entry(bad, index)] + [entry(good, n) for n in range(5, 7)]
    with pytest.raises(FakeLagoError) as caught:
        FakeLago(api_key=API_KEY).seed({key: items})
    message = str(caught.value)
    assert message.startswith(f"{key}[{index}]: "), message
    assert said in message, message
    assert caught.value.status == 422  # (Lago's status and body kept)
    if caught.value.body:
        assert said in caught.value.body["error_details"], caught.value.body


def test_a_seed_file_error_names_the_file_and_the_entry(tmp_path: Path) -> None:
    """``from_seed_file``: the file, then the entry, then Lago's answer."""
    path = tmp_path / "seed.json"
    path.write_text(
        json.dumps({"wallets": [{"external_customer_id": "a"}, {"external_customer_id": "b", "balance_cents": [1]}]}),
        encoding="utf-8",
    )
    with pytest.raises(FakeLagoError) as caught:
        FakeLago.from_seed_file(path)
    assert str(caught.value).startswith(f"seed file {str(path)!r}: wallets[1]: "), str(caught.value)
    assert caught.value.body == invalid(balance_cents="value_is_invalid")


# ------------------------------------------------------------------------------ control routes: lone surrogates


@pytest.fixture
async def client() -> AsyncIterator[tuple[FakeLago, httpx.AsyncClient]]:
    fake = FakeLago(api_key=API_KEY)
    fake.add_customer("acme")
    async with fake.client() as client:
        yield fake, client


def raw(client: httpx.AsyncClient, method: str, path: str, body: bytes) -> Any:
    return client.request(method, path, content=body, headers={"content-type": "application/json"})


#: Fault specs holding a lone surrogate (a JSON escape, raw UTF-8-encoded surrogate bytes, in a key)
SURROGATE_FAULTS: list[bytes] = [
    b'{"status": 503, "body": {"message": "\\ud800"}}',
    b'{"status": 503, "path": "/api/v1/\\udfff"}',
    b'{"status": 503, "\\ud800": 1}',
    b'{"status": 503, "body": ["\xed\xa0\x80"]}',
]


@pytest.mark.parametrize("body", SURROGATE_FAULTS)
async def test_a_fault_spec_holding_a_lone_surrogate_is_refused_with_its_422(
    client: tuple[FakeLago, httpx.AsyncClient], body: bytes
) -> None:
    """``POST /_emulator/faults`` holding a lone surrogate: the controls' 422 ``invalid_fault``, no rule stored (it
    was stored, and the faulted request or the listing then failed to encode it: a 500)."""
    fake, http = client
    answer = await raw(http, "POST", "/_emulator/faults", body)
    assert answer.status_code == 422
    assert answer.json()["code"] == "invalid_fault"
    assert "surrogate" in answer.json()["message"]
    assert fake.faults.rules == []
    assert (await http.get("/_emulator/faults")).json() == {"faults": []}
    assert (await http.get("/api/v1/customers/acme")).status_code == 200


#: (method, path, body) webhook controls holding a lone surrogate or nested deeper than the decoder goes
BAD_WEBHOOK_CONTROLS: list[tuple[str, str, bytes]] = [
    ("PUT", "/_emulator/webhooks", b'{"hmac_key": "\\ud800", "signature": "hmac"}'),
    ("PUT", "/_emulator/webhooks", b'{"issuer": "x\\udc00"}'),
    ("PUT", "/_emulator/webhooks", b'{"url": "http://receiver/\\ud800"}'),
    ("PUT", "/_emulator/webhooks", b'{"\\ud800": 1}'),
    ("PUT", "/_emulator/webhooks", b"[" * 100_000 + b"]" * 100_000),
    ("POST", "/_emulator/webhooks/redeliver", b'{"unique_key": "\\ud800"}'),
    ("POST", "/_emulator/webhooks/redeliver", b'{"unique_key": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
]


@pytest.mark.parametrize(("method", "path", "body"), BAD_WEBHOOK_CONTROLS, ids=lambda v: str(v)[:30])
async def test_a_webhook_control_body_holding_a_lone_surrogate_is_refused_with_its_422(
    client: tuple[FakeLago, httpx.AsyncClient], method: str, path: str, body: bytes
) -> None:
    """The webhook controls answer their 422 ``invalid_webhook_settings`` and keep the settings (a lone surrogate
    was stored and broke ``GET /_emulator/webhooks`` and every signature; a deep body was a 500)."""
    _, http = client
    before = (await http.get("/_emulator/webhooks")).json()
    answer = await raw(http, method, path, body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["code"] == "invalid_webhook_settings"
    assert (await http.get("/_emulator/webhooks")).json() == before


# -------------------------------------------------------------------------- latency in flight ended by a reset


@pytest.fixture
def entered(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set when the fault middleware starts waiting an injected latency (then waited for real)."""
    event = threading.Event()

    async def sleep(seconds: float) -> None:
        event.set()
        await anyio.sleep(seconds)

    monkeypatch.setattr(_faults, "_sleep", sleep)
    return event


@pytest.mark.parametrize(
    ("rule", "end", "answered"),
    [
        ({}, "reset", 503),  # the emulator's answer to a request held across a reset: not applied
        ({}, "clear", 200),
        ({"status": 500}, "clear", 500),  # the rule claimed the request when it arrived: its answer stands
        ({}, "delete", 200),
    ],
)
async def test_reset_or_clear_ends_a_latency_in_flight(
    entered: threading.Event, rule: dict[str, Any], end: str, answered: int
) -> None:
    """``reset()``, ``faults.clear()`` and ``DELETE /_emulator/faults`` end an injected latency being waited: the
    request goes on at once as its rules decided when it arrived (a minute's latency held it to the end)."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_customer("acme")
    fake.inject_fault(latency_ms=60_000, count=1, **rule)  # type: ignore[attr-defined]
    statuses: list[int] = []
    async with fake.client(timeout=None) as http:

        async def send() -> None:
            statuses.append((await http.get("/api/v1/customers/acme")).status_code)

        with anyio.fail_after(30):  # (a guard against hanging, far under the latency)
            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                while not entered.is_set():
                    await anyio.lowlevel.checkpoint()
                if end == "reset":
                    fake.reset()
                elif end == "clear":
                    fake.faults.clear()
                else:
                    assert (await http.delete("/_emulator/faults")).status_code == 200
    assert statuses == [answered]


@pytest.mark.parametrize("end", ["reset", "clear"])
def test_a_served_emulator_stops_quietly_once_a_held_request_is_ended(
    entered: threading.Event, caplog: pytest.LogCaptureFixture, end: str
) -> None:
    """Served: a request held by a latency whose client gave up, ended by ``reset()`` / ``faults.clear()`` from the
    test's thread; stopping the server then logs no error (uvicorn logged a CancelledError traceback after waiting
    for it)."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_customer("acme")
    answers: list[Any] = []
    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        with serve_in_thread(fake) as url:
            fake.inject_fault(latency_ms=600_000, count=1)  # type: ignore[attr-defined]

            def send() -> None:
                with httpx.Client(base_url=url, headers=AUTH, timeout=None) as http:
                    answers.append(http.get("/api/v1/customers/acme").status_code)

            sender = threading.Thread(target=send)
            sender.start()
            assert entered.wait(10)
            getattr(fake, end)() if end == "reset" else fake.faults.clear()
            sender.join(10)
            assert not sender.is_alive()
        assert answers == [503 if end == "reset" else 200]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
