"""The ``emulator`` and ``health`` commands given seeded random input, as users give it (``cli.main(argv)`` in
process; the emulator's serving in a subprocess on a free port, always killed).

Oracle: a valid seed file is served exactly as given (read back over HTTP on 127.0.0.1); bad input (the seed file, the
options, the LAGO_* variables) is one ``error: ...`` line naming the problem and the exit code the command's ``--help``
documents, never a traceback and never the banner of an emulator that will not serve."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import string
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago, serve_in_thread

# --------------------------------------------------------------------------------------------- the seed model

#: Characters of ids a URL path takes back (Lago's: no ".", "/", "?", "#", "%", blanks or controls), other scripts
#: included; names take anything but NUL (which Lago's Postgres refuses).
ID_CHARACTERS = string.ascii_letters + string.digits + "-_:@" + "éßжд日本"
NAME_CHARACTERS = ID_CHARACTERS + " .,'\"/?#%&<>\\\t\u00a0😀"


def _text(rng: random.Random, characters: str, low: int = 1, high: int = 12) -> str:
    return "".join(rng.choice(characters) for _ in range(rng.randint(low, high)))


def seed_model(seed: int) -> dict[str, list[dict[str, Any]]]:
    """A seed file Lago takes, drawn from ``seed``: its codes and ids start with ``s<seed>_`` (several models load
    into one emulator)."""
    rng = random.Random(seed)
    prefix = f"s{seed}_"

    def an_id(kind: str) -> str:
        return f"{prefix}{kind}_{_text(rng, ID_CHARACTERS)}"

    def a_name() -> str:
        # (no blank at either end: Lago strips names)
        return _text(rng, NAME_CHARACTERS).strip() or "n"

    metrics = []
    for index in range(rng.randint(1, 3)):
        aggregation = rng.choice(["count_agg", "sum_agg", "max_agg", "unique_count_agg", "latest_agg"])
        metric = {"code": f"{prefix}m{index}", "name": a_name(), "aggregation_type": aggregation}
        if aggregation != "count_agg":
            metric["field_name"] = _text(rng, string.ascii_lowercase)
        metrics.append(metric)
    features = [
        {
            "code": f"{prefix}f{index}",
            "name": a_name(),
            "privileges": [
                {"code": f"p{number}", "name": a_name(), "value_type": "integer"} for number in range(rng.randint(1, 2))
            ],
        }
        for index in range(rng.randint(0, 2))
    ]
    plans = []
    for index in range(rng.randint(1, 3)):
        plan: dict[str, Any] = {
            "code": f"{prefix}plan{index}",
            "name": a_name(),
            "interval": rng.choice(["weekly", "monthly", "quarterly", "yearly"]),
            "amount_cents": rng.choice([0, rng.randint(1, 10**6), 2**62]),
            "amount_currency": "USD",
            "charges": [
                {
                    "billable_metric_code": metric["code"],
                    "charge_model": "standard",
                    "properties": {"amount": rng.choice(["0", "0.00001", str(rng.randint(1, 10**6))])},
                }
                for metric in rng.sample(metrics, rng.randint(0, len(metrics)))
            ],
        }
        entitlements = {
            feature["code"]: {privilege["code"]: rng.randint(0, 10**9) for privilege in feature["privileges"]}
            for feature in features
            if rng.random() < 0.7
        }
        if entitlements:
            plan["entitlements"] = entitlements
        plans.append(plan)
    customers = [{"external_id": an_id("org"), "name": a_name(), "currency": "USD"} for _ in range(rng.randint(1, 4))]
    subscriptions = [
        {
            "external_customer_id": customer["external_id"],
            "plan_code": rng.choice(plans)["code"],
            "external_id": an_id("sub"),
        }
        for customer in customers
        if rng.random() < 0.8
    ]
    holders = rng.sample(customers, rng.randint(0, len(customers)))
    wallets = [
        {"external_customer_id": c["external_id"], "credits_balance": f"{rng.randint(0, 10**4)}.0"} for c in holders
    ]
    applied_coupons = [
        {
            "external_customer_id": c["external_id"],
            "coupon_code": an_id("coupon"),
            "amount_cents": rng.randint(1, 10**5),
        }
        for c in rng.sample(customers, rng.randint(0, len(customers)))
    ]
    invoices = [
        {"external_customer_id": c["external_id"], "total_amount_cents": rng.randint(0, 10**7)}
        for c in rng.sample(customers, rng.randint(0, len(customers)))
    ]
    return {
        "billable_metrics": metrics,
        "features": features,
        "plans": plans,
        "customers": customers,
        "subscriptions": subscriptions,
        "wallets": wallets,
        "applied_coupons": applied_coupons,
        "invoices": invoices,
    }


VALID_SEEDS = range(5)

# ----------------------------------------------------------------------------------- the emulator, served


@contextlib.contextmanager
def served_emulator(*options: str) -> Iterator[tuple[str, str]]:
    """``lago-org-billing emulator --port 0 OPTIONS`` in a subprocess; yields the two lines of its banner (the URL
    it says to export, and the whole banner) once uvicorn listens. Killed at the end, whatever happened."""
    command = [sys.executable, "-m", "lago_org_billing.cli", "emulator", "--port", "0", *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stderr is not None
        banner = process.stdout.readline() + process.stdout.readline()
        said = []
        for line in process.stderr:  # uvicorn says when it listens
            said.append(line)
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail(f"the emulator exited ({process.wait()}):\n{banner}{''.join(said)}")
        exported = banner.split("export LAGO_API_URL=", 1)[1].split()[0]
        yield exported, banner
    finally:
        process.kill()
        process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="module")
def served_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """The emulator command serving one seed file that holds every model of VALID_SEEDS, and a customer whose id has
    dots (Lago takes it in a body; Rails reads a dot in a path as a format: listed, not read by id)."""
    data: dict[str, list[dict[str, Any]]] = {}
    for seed in VALID_SEEDS:
        for key, items in seed_model(seed).items():
            data.setdefault(key, []).extend(items)
    data["customers"].append({"external_id": "acme.example.com", "name": "Dotted"})
    path = tmp_path_factory.mktemp("seed") / "seed.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with served_emulator("--api-key", "random-inputs-key", "--seed", str(path)) as (url, _banner):
        headers = {"Authorization": "Bearer random-inputs-key"}
        with httpx.Client(base_url=f"{url}/api/v1", headers=headers, trust_env=False) as client:
            yield client


def _read(client: httpx.Client, path: str, key: str, **params: Any) -> Any:
    response = client.get(path, params=params)
    assert response.status_code == 200, (path, response.text)
    return response.json()[key]


@pytest.mark.parametrize("seed", VALID_SEEDS)
def test_a_valid_seed_file_is_served_exactly_as_given(served_models: httpx.Client, seed: int) -> None:
    """Every object of a random valid seed file is served by the emulator command with the values it was given."""
    client, model = served_models, seed_model(seed)
    for metric in model["billable_metrics"]:
        served = _read(client, f"/billable_metrics/{quote(metric['code'], safe='')}", "billable_metric")
        assert {key: served[key] for key in metric} == metric
    for feature in model["features"]:
        served = _read(client, f"/features/{quote(feature['code'], safe='')}", "feature")
        assert served["name"] == feature["name"]
        assert [{k: p[k] for k in ("code", "name", "value_type")} for p in served["privileges"]] == feature[
            "privileges"
        ]
    for plan in model["plans"]:
        served = _read(client, f"/plans/{quote(plan['code'], safe='')}", "plan")
        assert {key: served[key] for key in ("code", "name", "interval", "amount_cents", "amount_currency")} == {
            key: plan[key] for key in ("code", "name", "interval", "amount_cents", "amount_currency")
        }
        charges = [(c["billable_metric_code"], c["charge_model"], c["properties"]) for c in served["charges"]]
        assert charges == [(c["billable_metric_code"], c["charge_model"], c["properties"]) for c in plan["charges"]]
        entitlements = {
            e["code"]: {p["code"]: p["value"] for p in e["privileges"]} for e in served.get("entitlements") or []
        }
        assert entitlements == plan.get("entitlements", {})
    for customer in model["customers"]:
        served = _read(client, f"/customers/{quote(customer['external_id'], safe='')}", "customer")
        assert {key: served[key] for key in customer} == customer
    for subscription in model["subscriptions"]:
        served = _read(client, f"/subscriptions/{quote(subscription['external_id'], safe='')}", "subscription")
        assert {key: served[key] for key in subscription} == subscription
        assert served["status"] == "active"
    for wallet in model["wallets"]:
        [served] = _read(client, "/wallets", "wallets", external_customer_id=wallet["external_customer_id"])
        assert served["credits_balance"] == wallet["credits_balance"]
    for coupon in model["applied_coupons"]:
        [served] = _read(
            client, "/applied_coupons", "applied_coupons", external_customer_id=coupon["external_customer_id"]
        )
        assert {key: served[key] for key in coupon} == coupon
    for invoice in model["invoices"]:
        [served] = _read(client, "/invoices", "invoices", external_customer_id=invoice["external_customer_id"])
        assert served["total_amount_cents"] == invoice["total_amount_cents"]


def test_a_customer_id_with_dots_is_listed_as_given(served_models: httpx.Client) -> None:
    """A seeded customer whose external id has dots is served in the customer list with that id."""
    listed = _read(served_models, "/customers", "customers", per_page=100)
    assert "acme.example.com" in [customer["external_id"] for customer in listed]


# ----------------------------------------------------------------------------------- bad input, in process


def _exit_of(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return int(exc.code or 0)


def run_emulator(capsys: pytest.CaptureFixture[str], *options: str, port: int | None = None) -> tuple[int, str, str]:
    """``main(["emulator", ...])`` with ``--port`` a port in use unless given: a seed file or host the command takes
    ends at the port (exit 2, "cannot listen on"), never serving in the test's process."""
    capsys.readouterr()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        code = _exit_of(["emulator", "--port", str(port if port is not None else taken.getsockname()[1]), *options])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, out: str, err: str, *said: str | tuple[str, ...]) -> None:
    """Exit 2, nothing on stdout (no banner), one ``error:`` line on stderr saying each of ``said`` (a tuple: one of
    its words)."""
    assert code == 2, (code, err)
    assert out == "", out
    assert "Traceback" not in err, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for words in said:
        assert any(word in err for word in ((words,) if isinstance(words, str) else words)), (words, err)


#: What the command says of a value the emulator's invoice and wallet seeding does not check the type of (its own
#: error naming the field, or the command's "a value of the wrong type").
WRONG_TYPE = "wrong type"

BROKEN_SEED_FILES: dict[str, tuple[bytes, str | tuple[str, ...]]] = {
    # name: (content, what the error says besides the file's name)
    "not JSON": (b"{plans: []}", "not valid JSON"),
    "empty": (b"", "not valid JSON"),
    "blanks only": (b" \n\t\n", "not valid JSON"),
    "a UTF-8 BOM": (b"\xef\xbb\xbf{}", "BOM"),
    "Latin-1 text": ('{"customers": [{"external_id": "org_café"}]}'.encode("latin-1"), "UTF-8"),
    "UTF-16 text": ('{"plans": []}'.encode("utf-16"), "UTF-8"),
    "an array": (b"[]", "JSON object"),
    "null": (b"null", "JSON object"),
    "an unknown key": (b'{"coupons": []}', "unknown seed key"),
    "a key holding an object": (b'{"plans": {"code": "p"}}', "must be a list of objects"),
    "an item that is no object": (b'{"customers": ["org_1"]}', "must be a list of objects"),
    "a wrong type": (b'{"plans": [{"code": "p", "amount_cents": "ten"}]}', "amount_cents"),
    "a duplicate plan code": (b'{"plans": [{"code": "p"}, {"code": "p"}]}', "value_already_exist"),
    "a duplicate metric code": (b'{"billable_metrics": [{"code": "m"}, {"code": "m"}]}', "value_already_exist"),
    "a subscription id of another customer": (
        b'{"plans": [{"code": "p"}], "subscriptions": [{"external_customer_id": "a", "plan_code": "p", '
        b'"external_id": "s"}, {"external_customer_id": "b", "plan_code": "p", "external_id": "s"}]}',
        "value_already_exist",
    ),
    "an unknown plan": (b'{"subscriptions": [{"external_customer_id": "a", "plan_code": "nope"}]}', "plan_not_found"),
    "deep nesting": (b'{"customers": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", "not valid JSON"),
    "a number of 5000 digits": (b'{"plans": [{"code": "p", "amount_cents": ' + b"9" * 5000 + b"}]}", "digits"),
    "an invoice amount that is a word": (
        b'{"invoices": [{"external_customer_id": "a", "total_amount_cents": "ten"}]}',
        (WRONG_TYPE, "total_amount_cents"),
    ),
    "an invoice amount that is infinite": (
        b'{"invoices": [{"external_customer_id": "a", "fees_amount_cents": 1e400}]}',
        (WRONG_TYPE, "fees_amount_cents"),
    ),
    "a wallet balance that is a list": (
        b'{"wallets": [{"external_customer_id": "a", "balance_cents": [1]}]}',
        (WRONG_TYPE, "balance_cents"),
    ),
    "wallet top-up rules that are a word": (
        b'{"wallets": [{"external_customer_id": "a", "recurring_transaction_rules": "monthly"}]}',
        (WRONG_TYPE, "recurring_transaction_rules"),
    ),
}


@pytest.mark.parametrize("name", BROKEN_SEED_FILES)
def test_a_broken_seed_file_is_one_error_line_and_exit_2(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A seed file that cannot be read or holds what Lago would refuse: exit 2 and one line naming the file and the
    problem, before any banner (non-UTF-8 text and mistyped invoice or wallet amounts were tracebacks)."""
    content, said = BROKEN_SEED_FILES[name]
    path = tmp_path / "seed.json"
    path.write_bytes(content)
    assert_one_error_line(*run_emulator(capsys, "--seed", str(path)), repr(str(path)), said)


@pytest.mark.parametrize(
    ("name", "make", "said"),
    [
        ("a directory", lambda tmp: tmp, "Is a directory"),
        ("a missing file", lambda tmp: tmp / "missing.json", "No such file"),
    ],
)
def test_a_seed_path_that_is_no_file_is_one_error_line(
    name: str, make: Callable[[Path], Path], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--seed`` naming a directory or nothing: exit 2, one line saying why the file cannot be read."""
    path = make(tmp_path)
    assert_one_error_line(*run_emulator(capsys, "--seed", str(path)), "cannot read", said)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_seed_file_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A seed file the user may not read: exit 2, one line saying so."""
    path = tmp_path / "seed.json"
    path.write_text("{}")
    path.chmod(0)
    assert_one_error_line(*run_emulator(capsys, "--seed", str(path)), "cannot read", "Permission denied")


#: Values a mistyped seed file holds where the model has another.
ODD_VALUES: list[Any] = [None, True, 0, -1, 1.5, 10**30, 1e300, "", "ten", "1e400", "NaN", "é😀", [], [1], {}, {"a": 1}]


def _places(node: Any) -> list[tuple[Any, Any]]:
    """Each (container, key or index) of the JSON document ``node``, depth first."""
    keys = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else ()
    return [place for key in keys for place in [(node, key), *_places(node[key])]]


def _mutated(seed: int) -> dict[str, Any]:
    """The model of ``seed`` with one to three values replaced by an odd one, a key added or one removed."""
    rng = random.Random(seed)
    data: Any = seed_model(seed)
    for _ in range(rng.randint(1, 3)):
        node, key = rng.choice(_places(data))
        action = rng.random()
        if action < 0.75:
            node[key] = json.loads(json.dumps(rng.choice(ODD_VALUES)))
        elif action < 0.9 and isinstance(node, dict):
            node[_text(rng, string.ascii_lowercase)] = json.loads(json.dumps(rng.choice(ODD_VALUES)))
        else:
            del node[key]
    return data  # type: ignore[no-any-return]


@pytest.mark.parametrize("seed", [0, 1, 3, 7, 51, 89, 107, 273])  # (51...: tracebacks before the fix)
def test_a_mistyped_seed_file_is_taken_or_refused_in_one_line(
    seed: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A random valid seed file with values changed to other types: taken (the command goes on to the port, taken
    here) or refused in one line naming the file, never a traceback."""
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(_mutated(seed), ensure_ascii=False), encoding="utf-8")
    code, out, err = run_emulator(capsys, "--seed", str(path))
    assert_one_error_line(code, out, err)
    assert "cannot listen on" in err or repr(str(path)) in err, err


@pytest.mark.parametrize("seed", range(3))
def test_a_port_out_of_range_or_not_a_number_is_refused(seed: int, capsys: pytest.CaptureFixture[str]) -> None:
    """``--port`` out of 0..65535 is one line saying the range; one that is no whole number is argparse's usage
    error for --port; both exit 2."""
    rng = random.Random(seed)
    port = rng.choice([rng.randint(65536, 10**6), -rng.randint(1, 10**6), 10 ** rng.randint(20, 60)])
    assert_one_error_line(*run_emulator(capsys, port=port), "between 0 and 65535", str(port))
    word = rng.choice(["", "abc", "1e3", "0x50", "80.0", "3000/tcp", _text(rng, string.punctuation.replace("-", ""))])
    capsys.readouterr()
    assert _exit_of(["emulator", "--port", word]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert f"argument --port: invalid int value: {word!r}" in err, err


def test_a_port_in_use_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    """``--port`` of a port another server holds: exit 2, one line asking for another port."""
    assert_one_error_line(*run_emulator(capsys), "cannot listen on 127.0.0.1", "--port")


@pytest.mark.parametrize("seed", range(2))
def test_a_host_of_another_machine_is_one_error_line(seed: int, capsys: pytest.CaptureFixture[str]) -> None:
    """``--host`` an address of no interface here (TEST-NET) or a name that resolves to none: exit 2, one line
    naming the host."""
    rng = random.Random(seed)
    host = rng.choice([f"192.0.2.{rng.randint(1, 254)}", f"{_text(rng, string.ascii_lowercase)}.invalid"])
    assert_one_error_line(*run_emulator(capsys, "--host", host, port=0), f"cannot listen on {host}", "--host")


@pytest.mark.parametrize("raw", [b"\xff", b"caf\xe9", b"lo\xc3calhost"])
def test_a_host_that_is_no_text_is_one_error_line(raw: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    """A ``--host`` of bytes that are not UTF-8 (a shell variable of another encoding; Python gives them as lone
    surrogates) is one error line naming --host, exit 2 (it was a TypeError traceback: "encoding of hostname
    failed")."""
    host = os.fsdecode(raw)
    assert_one_error_line(*run_emulator(capsys, "--host", host, port=0), "--host")


def test_the_emulator_help_states_its_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """``emulator --help`` states its exit codes (it said none: a script could not tell a bad seed file from a
    stop)."""
    with pytest.raises(SystemExit):
        main(["emulator", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for said in ("Exit codes: 130 stopped with Ctrl-C", "2 a seed file", "port taken", "host"):
        assert said in text, said


# ------------------------------------------------------------------------------ hosts of every interface


@pytest.mark.parametrize(("host", "expected"), [("0.0.0.0", "http://127.0.0.1:"), ("", "http://127.0.0.1:")])
def test_a_host_of_every_interface_prints_the_url_the_emulator_signs_with(host: str, expected: str) -> None:
    """The banner of ``--host 0.0.0.0`` (or ``""``, an unset shell variable) names the loopback URL the emulator's JWT
    webhooks name as issuer: it printed ``export LAGO_API_URL=http://0.0.0.0:P`` (``http://:P``, no URL at all), and
    an app set as told refused every webhook (issuer mismatch). ``--host ::`` gets ``http://[::1]:P`` the same way."""
    with served_emulator("--host", host) as (url, banner):
        assert url.startswith(expected), banner
        with httpx.Client(base_url=url, trust_env=False) as client:
            assert client.get("/health").status_code == 200
            assert client.get("/_emulator/webhooks").json()["webhooks"]["issuer"] == url


# ------------------------------------------------------------------------------------------------- health


@pytest.fixture(scope="module")
def served_lago() -> Iterator[tuple[FakeLago, str]]:
    """One emulator served on 127.0.0.1 for the module's health checks (reset by each test)."""
    fake = FakeLago(api_key="health-key")
    with serve_in_thread(fake) as url:
        yield fake, url


@pytest.fixture
def lago(served_lago: tuple[FakeLago, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeLago, str]]:
    """The module's emulator, reset, with LAGO_API_URL / LAGO_API_KEY naming it."""
    fake, url = served_lago
    fake.reset()
    monkeypatch.setenv("LAGO_API_URL", url)
    monkeypatch.setenv("LAGO_API_KEY", "health-key")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    try:
        yield fake, url
    finally:
        fake.reset()  # (cancels a request a latency fault still holds)


def run_health(capsys: pytest.CaptureFixture[str], *options: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = _exit_of(["health", *options])
    out, err = capsys.readouterr()
    return code, out, err


def test_health_of_a_lago_up_is_exit_0(lago: tuple[FakeLago, str], capsys: pytest.CaptureFixture[str]) -> None:
    """``health`` against the emulator up: exit 0, and --json says healthy."""
    lago[0].add_billable_metric("api_call")  # (else rightly warned of, on stderr: LAGO_EVENT_CODE names no metric)
    code, out, err = run_health(capsys)
    assert code == 0 and "is healthy" in out and err == "", (out, err)
    code, out, _err = run_health(capsys, "--json")
    assert code == 0 and json.loads(out)["healthy"] is True


def test_health_of_a_lago_down_is_exit_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``health`` against a port nothing listens on: exit 1 saying so, --json one document."""
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    monkeypatch.setenv("LAGO_API_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("LAGO_API_KEY", "k")
    code, out, err = run_health(capsys)
    assert code == 1 and out == "" and "NOT healthy" in err and "Traceback" not in err, err
    code, out, _err = run_health(capsys, "--json")
    assert code == 1 and json.loads(out)["healthy"] is False


def test_health_of_a_slow_lago_is_exit_1(
    lago: tuple[FakeLago, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``health`` against a Lago slower than LAGO_API_TIMEOUT: exit 1 naming the timeout, not a hang."""
    fake, _url = lago
    monkeypatch.setenv("LAGO_API_TIMEOUT", "0.05")
    # (short: the emulator's reset does not end the latency, and the server's shutdown waits for it)
    fake.inject_fault(status=503, latency_ms=300, path="/health")
    code, out, err = run_health(capsys)
    assert code == 1 and out == "" and "NOT healthy" in err and "LAGO_API_TIMEOUT" in err, err


@pytest.mark.parametrize("seed", range(4))
def test_health_of_a_lago_answering_errors_is_exit_1(
    seed: int, lago: tuple[FakeLago, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``health`` against a Lago answering a random error status (on /health, or on the API behind it): exit 1,
    one line naming the status; --json one document saying unhealthy."""
    fake, _url = lago
    rng = random.Random(seed)
    status = rng.choice([400, 401, 403, 404, 422, 429, 500, 502, 503, 504, rng.randint(400, 599)])
    fake.inject_fault(status=status, path=rng.choice(["/health", "/api/v1"]))
    code, out, err = run_health(capsys)
    assert code == 1 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert "NOT healthy" in err and str(status) in err, err
    code, out, _err = run_health(capsys, "--json")
    report = json.loads(out)
    assert code == 1 and report["healthy"] is False and str(status) in report["error"]


def _broken_setting(rng: random.Random) -> tuple[str, str]:
    """A LAGO_* variable set to a value the settings refuse."""
    return rng.choice(
        [
            ("LAGO_API_URL", rng.choice(["", "lago:3000", "ftp://lago", "http://", "http://[::1"])),
            ("LAGO_API_URL", f"http://127.0.0.1:{rng.randint(65536, 10**6)}"),
            ("LAGO_API_URL", f"http://la go{_text(rng, string.ascii_lowercase)}:3000"),
            ("LAGO_API_TIMEOUT", rng.choice(["0", "-1", "nan", "inf", "1e999", _text(rng, string.ascii_lowercase)])),
            ("LAGO_API_KEY", _text(rng, string.ascii_letters) + rng.choice([" ", "\n", "\x7f", "é", "\u201c"]) + "k"),
            ("LAGO_MAX_RETRIES", _text(rng, string.ascii_lowercase)),
        ]
    )


@pytest.mark.parametrize("seed", range(6))
def test_health_with_a_broken_setting_is_exit_2_naming_it(
    seed: int, lago: tuple[FakeLago, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A random LAGO_* variable broken: exit 2 (``health --help``: settings missing or malformed), one line naming
    the variable; --json one document with that exit code."""
    name, value = _broken_setting(random.Random(seed))
    monkeypatch.setenv(name, value)
    code, out, err = run_health(capsys)
    assert code == 2 and out == "" and "Traceback" not in err, (name, value, err)
    assert err.startswith(f"error: {name}") and err.count("\n") == 1, (name, value, err)
    code, out, _err = run_health(capsys, "--json")
    report = json.loads(out)
    assert code == 2 and report["healthy"] is False and report["exit_code"] == 2 and name in report["error"]
