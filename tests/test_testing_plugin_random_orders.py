"""The plugin's fixtures in a user's test module run in random orders: every test starts fresh, nothing is left after.

Seeded modules of tests asking for ``fake_lago``, ``fake_lago_server``, ``lago_settings``, ``lago_client`` and
``monkeypatch`` in random combinations (sync, anyio on asyncio and trio, a user fixture failing in its setup, tests
failing on purpose after changing the emulator, its clock, faults, webhooks settings and the environment), run by
``pytester`` in process in shuffled orders: each test checks it sees an emulator of its own, empty, without faults,
webhook endpoint or moved clock, and an environment without what an earlier test set; after the run no served
emulator thread, port or environment variable is left.

The defects found (each test failed before its fix):

* ``NO_PROXY`` set alone (upper case, as most CI runners set it): ``fake_lago_server`` set ``no_proxy=127.0.0.1``
  beside it, and clients reading the lower-case variable first (urllib, httpx, requests) lost the user's own
  exceptions for the test (a request to ``localhost`` went to the proxy);
* a test setting ``NO_PROXY`` with its own ``monkeypatch`` (asked for before ``fake_lago_server``) left the
  fixture's ``...,127.0.0.1`` behind in the environment of every later test: two monkeypatches undone in the wrong
  order.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import pytest

pytest_plugins = ["pytester"]

PROXY_NAMES = ("NO_PROXY", "no_proxy")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _proxy_environ() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name.lower() in ("no_proxy", "http_proxy")}


# --------------------------------------------------------------------------- NO_PROXY while served


@pytest.fixture
def proxied_but_not_localhost(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A CI runner's environment: a proxy, and ``NO_PROXY`` (upper case only) exempting ``localhost``."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{_closed_port()}")  # a proxy that answers nothing
    monkeypatch.setenv("NO_PROXY", "localhost")
    yield


def test_an_upper_case_no_proxy_still_applies_in_a_served_test(
    proxied_but_not_localhost: None, fake_lago_server: Any
) -> None:
    """The user's ``NO_PROXY`` exceptions still apply while the emulator is served: a request to ``localhost`` (a
    service of the test's own; here the emulator itself) is not sent to the proxy."""
    port = fake_lago_server.url.rsplit(":", 1)[1]
    with httpx.Client() as client:  # (trust_env: it reads the proxy variables)
        assert client.get(f"http://localhost:{port}/health").status_code == 200
        assert client.get(f"{fake_lago_server.url}/health").status_code == 200
    for name in PROXY_NAMES:
        assert os.environ[name].split(",") == ["localhost", "127.0.0.1"], name


def test_a_no_proxy_set_by_the_test_itself_is_not_left_behind(
    pytester: pytest.Pytester, other_plugins_off: Callable[..., list[str]]
) -> None:
    """A test setting ``NO_PROXY`` with its ``monkeypatch`` (asked for first) leaves the environment as it found it,
    for the next tests of the run and after the run."""
    pytester.makepyfile(
        """
        import os

        def test_sets_it(monkeypatch, fake_lago_server):
            monkeypatch.setenv("NO_PROXY", os.environ["NO_PROXY"] + ",internal.example")

        def test_next():
            assert "NO_PROXY" not in os.environ and "no_proxy" not in os.environ
        """
    )
    before = _proxy_environ()
    result = pytester.runpytest_inprocess(*other_plugins_off(), "-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    assert _proxy_environ() == before


# --------------------------------------------------------------------------- seeded modules in random orders

_CONFTEST = """
import random
import pytest

@pytest.fixture
def broken_local(fake_lago):
    fake_lago.add_customer("left_by_a_broken_fixture")
    fake_lago.inject_fault(status=500)
    raise RuntimeError("broken on purpose")

@pytest.fixture
def broken_served(fake_lago_server):
    fake_lago_server.add_customer("left_by_a_broken_fixture")
    fake_lago_server.webhook_dispatcher.configure(url="http://127.0.0.1:9/hooks", signature="hmac")
    raise RuntimeError("broken on purpose")

@pytest.fixture
def broken_teardown(fake_lago):
    yield
    fake_lago.inject_fault(status=503)
    raise RuntimeError("broken teardown on purpose")

def pytest_collection_modifyitems(items):
    random.Random({order}).shuffle(items)
"""

#: The top of every generated module: what each test checks first (an emulator of its own, fresh, and the
#: environment the run started with, but for what the served emulator adds to NO_PROXY while it is served).
_PRELUDE = """
import datetime as dt
import os
import httpx
import pytest

STARTING_ENVIRON = {{k: v for k, v in os.environ.items() if k.startswith("LAGO_") or k.lower() in ("no_proxy",)}}
URLS = {urls!r}
SEEN = []  # every emulator a test got (kept: an id is not reused while they are alive)
CLOCKS = []  # every clock a test installed
AUTH = {{"Authorization": "Bearer test-api-key"}}


def _environ():
    return {{k: v for k, v in os.environ.items() if k.startswith("LAGO_") or k.lower() in ("no_proxy",)}}


def fresh(fake, served, settings=None):
    assert all(fake is not other for other in SEEN)
    SEEN.append(fake)
    assert (fake.customers, fake.subscriptions, fake.events, fake.invoices, fake.requests) == ([], [], [], [], [])
    assert fake.faults.rules == [] and fake.emitted_webhooks == []
    dispatcher = fake.webhook_dispatcher
    assert not dispatcher.enabled and dispatcher.deliveries == [] and dispatcher.pending == []
    assert all(fake.clock is not clock for clock in CLOCKS)
    assert fake.now().year >= 2025  # (the default clock: no test's 2031)
    expected = dict(STARTING_ENVIRON)
    if served:
        assert fake.url.startswith("http://127.0.0.1:") and dispatcher.issuer == fake.url
        with open(URLS, "a") as urls:
            urls.write(fake.url + "\\n")
        for name, other in (("NO_PROXY", "no_proxy"), ("no_proxy", "NO_PROXY")):
            value = STARTING_ENVIRON.get(name) or STARTING_ENVIRON.get(other)
            expected[name] = f"{{value}},127.0.0.1" if value else "127.0.0.1"
    else:
        assert getattr(fake, "url", None) is None and dispatcher.issuer == "http://fake-lago"
    assert _environ() == expected
    if settings is not None:
        assert settings.api_url == (fake.url if served else fake.base_url) and settings.api_key == fake.api_key


def a_clock():
    clock = lambda: dt.datetime(2031, 1, 1, tzinfo=dt.timezone.utc)
    CLOCKS.append(clock)
    return clock


def create_app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from lago_org_billing import OrgBillingMiddleware

    async def hello(request):
        return JSONResponse({{"hello": "world"}})

    app = Starlette(routes=[Route("/hello", hello)])
    app.add_middleware(OrgBillingMiddleware)
    return app
"""


def _test_source(rng: random.Random, i: int) -> tuple[str, str]:
    """One test of a generated module, and the outcome it must have: passed, failed, error (its setup) or
    ``passed+error`` / ``failed+error`` (a user fixture failing at teardown)."""
    served = rng.random() < 0.25
    fake = "fake_lago_server" if served else "fake_lago"
    backend = rng.choice([None, None, "asyncio", "trio"])
    fixtures = [fake]
    if rng.random() < 0.5:
        fixtures.append("lago_settings")
    if backend and rng.random() < 0.7:
        fixtures.append("lago_client")
    if rng.random() < 0.5:
        fixtures.append("monkeypatch")
    broken = rng.random() < 0.12
    if broken:
        fixtures.append("broken_served" if served else "broken_local")
    broken_teardown = not broken and rng.random() < 0.08
    if broken_teardown:
        fixtures.append("broken_teardown")
    fails = rng.random() < 0.3
    rng.shuffle(fixtures)  # (the order they are set up in, and torn down in reverse)

    settings = "lago_settings" if "lago_settings" in fixtures else "None"
    body = [f"fresh({fake}, {served}, {settings})"]
    actions = ["customer", "subscription", "fault", "clock", "webhooks"]
    if "monkeypatch" in fixtures:
        actions.append("environ")
        if served and not backend:
            actions.append("app")
    if served:
        actions.append("http")
    if "lago_client" in fixtures:
        actions.append("client")
    for action in rng.sample(actions, rng.randint(1, min(3, len(actions)))):
        if action == "customer":
            body.append(f'{fake}.add_customer("c{i}")')
        elif action == "subscription":
            body += [f'{fake}.add_plan("p{i}")', f'{fake}.add_subscription("o{i}", "p{i}")']
        elif action == "fault":
            body.append(f"{fake}.inject_fault(status=503, path='/api/v1/nothing')")
        elif action == "clock":
            body.append(f"{fake}.clock = a_clock()")
        elif action == "webhooks":
            body.append(f'{fake}.webhook_dispatcher.configure(url="http://127.0.0.1:9/hooks", signature="hmac")')
        elif action == "environ":
            body += [
                f'monkeypatch.setenv("LAGO_API_URL", getattr({fake}, "url", None) or {fake}.base_url)',
                f'monkeypatch.setenv({rng.choice(PROXY_NAMES)!r}, "set-by-test-{i}.example")',
            ]
        elif action == "app":
            body += [
                f'monkeypatch.setenv("LAGO_API_URL", {fake}.url)',
                f"monkeypatch.setenv('LAGO_API_KEY', {fake}.api_key)",
                'monkeypatch.setenv("LAGO_ORG_HEADER", "X-Org-Id")',
                f'{fake}.add_plan("starter")',
                f'{fake}.add_subscription("org_{i}", "starter")',
                "from starlette.testclient import TestClient",
                "with TestClient(create_app()) as client:",
                f'    assert client.get("/hello", headers={{"X-Org-Id": "org_{i}"}}).status_code == 200',
                f'assert [e["properties"]["org_id"] for e in {fake}.events] == ["org_{i}"]',
            ]
        elif action == "http":
            body += [
                f"with httpx.Client(base_url={fake}.url, headers=AUTH) as http:",
                f'    answer = http.post("/api/v1/customers", json={{"customer": {{"external_id": "h{i}"}}}})',
                "    assert answer.status_code == 200",
            ]
        elif action == "client":
            body += [
                f'{fake}.add_plan("q{i}")',
                f'await lago_client.create_subscription(external_customer_id="l{i}", plan_code="q{i}", '
                f'external_id="l{i}")',
                f'assert "l{i}" in [c["external_id"] for c in {fake}.customers]',
            ]
    if fails:
        body.append(f'raise AssertionError("on purpose {i}")')
    head = ""
    if backend:
        head = f"@pytest.mark.anyio\n@pytest.mark.parametrize('anyio_backend', [{backend!r}])\nasync "
        fixtures.append("anyio_backend")
    source = f"{head}def test_{i}({', '.join(fixtures)}):\n" + "".join(f"    {line}\n" for line in body)
    outcome = "error" if broken else "failed" if fails else "passed"
    return source, f"{outcome}+error" if broken_teardown else outcome


def _outcomes(reports: Sequence[pytest.TestReport]) -> tuple[list[str], dict[str, str]]:
    """The tests in the order they ran, and each one's outcome (as :func:`_test_source` names them)."""
    order: list[str] = []
    phases: dict[str, dict[str, str]] = {}
    for report in reports:
        name = report.nodeid.split("::")[-1].split("[")[0]
        if report.when == "setup":
            order.append(name)
        phases.setdefault(name, {})[report.when] = report.outcome
    outcomes: dict[str, str] = {}
    for name, seen in phases.items():
        if seen["setup"] != "passed":
            outcomes[name] = "error"
        else:
            outcome = "passed" if seen["call"] == "passed" else "failed"
            outcomes[name] = outcome if seen["teardown"] == "passed" else f"{outcome}+error"
    return order, outcomes


def _import_the_package() -> None:
    """Import what the generated tests use, once, when this module is collected: ``pytester`` forgets the modules first
    imported during one of its runs (or during a test using it), and a class of the package imported then and again
    later is two classes ("QuotaGate(settings) must be a BillingSettings, got BillingSettings")."""
    import lago_org_billing
    import lago_org_billing.testing
    from lago_org_billing.testing import _webhooks  # noqa: F401  (FakeLago() imports it)

    for package in (lago_org_billing, lago_org_billing.testing):
        for name in package.__all__:
            getattr(package, name)


_import_the_package()


def _closed(url: str) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", int(url.rsplit(":", 1)[1]))) != 0


#: The environments the runs start in: none of the proxy variables, or a CI's, upper or lower case, or both.
_STARTING: tuple[dict[str, str], ...] = (
    {},
    {"NO_PROXY": "localhost"},
    {"no_proxy": ".internal"},
    {"NO_PROXY": "a.example", "no_proxy": "b"},
)


@pytest.mark.parametrize("seed", [12, 27, 46])  # (served, failing fixtures, proxy variables, trio)
def test_generated_modules_in_random_orders(
    seed: int,
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    other_plugins_off: Callable[..., list[str]],
) -> None:
    """Every test of a seeded module sees an emulator of its own, fresh, and the run's starting environment, in any
    order, with tests and fixtures failing on purpose beside them; nothing is left running or set afterwards."""
    rng = random.Random(seed)
    for name, value in rng.choice(_STARTING).items():
        monkeypatch.setenv(name, value)
    urls = pytester.path / "urls.txt"
    tests = [_test_source(rng, i) for i in range(8)]
    expected = {f"test_{i}": outcome for i, (_, outcome) in enumerate(tests)}
    pytester.makepyfile(
        test_generated=_PRELUDE.format(urls=str(urls)) + "\n\n" + "\n\n".join(source for source, _ in tests)
    )
    if rng.random() < 0.5:  # named by a conftest too (PYTEST_DISABLE_PLUGIN_AUTOLOAD users), beside the entry point
        pytest_plugins = 'pytest_plugins = ["lago_org_billing.testing.pytest_plugin"]\n'
    else:
        pytest_plugins = ""
    before = (_proxy_environ(), {k for k in os.environ if k.startswith("LAGO_")})
    orders = []
    for order in (rng.randrange(2**32), rng.randrange(2**32)):
        pytester.makeconftest(pytest_plugins + _CONFTEST.format(order=order))
        urls.write_text("")
        reprec = pytester.inline_run(*other_plugins_off(), "-p", "no:cacheprovider", "-p", "no:randomly")
        ran, outcomes = _outcomes(reprec.getreports("pytest_runtest_logreport"))
        assert outcomes == expected, "\n".join(str(r.longrepr) for r in reprec.getfailures())
        orders.append(ran)
        assert not [t.name for t in threading.enumerate() if t.name.startswith("fake-lago-")]
        assert (_proxy_environ(), {k for k in os.environ if k.startswith("LAGO_")}) == before
        assert all(_closed(url) for url in urls.read_text().split())
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])
