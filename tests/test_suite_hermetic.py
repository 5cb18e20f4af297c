"""The suite's hermeticity: what the machine running it has must not decide its outcome.

* A developer's shell (``LAGO_API_KEY``, ``LAGO_API_URL``, ``LAGO_SPOOL_PATH``, ``LAGO_REDIS_URL``...) or a corporate
  CI's proxy (``HTTPS_PROXY``...): ``tests/conftest.py`` removed the ``LAGO_*`` variables in a function-scoped fixture,
  after module and session fixtures had run with them (migrations, servers, subprocesses), and the proxies not at all
  (every request of a test to the emulator on 127.0.0.1 went to the proxy: connection refused).
* pytest plugins installed beside ours (pytest-asyncio, pytest-randomly, pytest-benchmark...): a user's project run by
  ``pytester`` loaded them all, and pytest-asyncio's warning of an unset ``asyncio_default_fixture_loop_scope`` was an
  INTERNALERROR under ``-W error`` (the README's testing blocks and the plugin's own tests failed). The
  ``other_plugins_off`` fixture of the conftest turns them off by their entry points' names.

Each runs a small project by ``pytester`` with this suite's ``conftest.py``.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")

MACHINE = {
    "LAGO_API_KEY": "developer-key",
    "LAGO_API_URL": "http://127.0.0.1:9",
    "LAGO_SPOOL_PATH": "/nonexistent/developer/spool.db",
    "LAGO_REDIS_URL": "redis://127.0.0.1:9/0",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "SSL_CERT_FILE": "/nonexistent/ca.pem",
}

SEEN = """
    import os

    import pytest

    NAMES = {names!r}
    AT_IMPORT = sorted(name for name in os.environ if name in NAMES)


    @pytest.fixture(scope="module")
    def at_module_setup():
        return sorted(name for name in os.environ if name in NAMES)


    def test_import_sees_none():
        assert AT_IMPORT == []


    def test_module_fixture_sees_none(at_module_setup):
        assert at_module_setup == []


    def test_a_test_sees_none():
        assert sorted(name for name in os.environ if name in NAMES) == []


    def test_a_test_setting_one_with_monkeypatch(monkeypatch):
        monkeypatch.setenv("LAGO_API_KEY", "set-by-the-test")
        assert os.environ["LAGO_API_KEY"] == "set-by-the-test"


    def test_after_it_none_either():
        assert sorted(name for name in os.environ if name in NAMES) == []
"""


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The variables of a developer's shell and a CI's proxy set in this process (the project run in process sees
    them as its environment), undone after the test."""
    for name, value in MACHINE.items():
        monkeypatch.setenv(name, value)
    return MACHINE


def test_no_test_module_or_fixture_sees_the_machines_variables(
    pytester: pytest.Pytester, machine: dict[str, str], other_plugins_off: Callable[..., list[str]]
) -> None:
    pytester.makeconftest(CONFTEST.read_text(encoding="utf-8"))
    pytester.makepyfile(test_seen=textwrap.dedent(SEEN.format(names=set(machine))))
    result = pytester.runpytest_inprocess(*other_plugins_off(), "-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=5)
    # ... and the run gives them back to the process that ran it.
    assert {name: os.environ.get(name) for name in machine} == machine


def test_a_subprocess_of_a_module_fixture_gets_none(
    pytester: pytest.Pytester, machine: dict[str, str], other_plugins_off: Callable[..., list[str]]
) -> None:
    """A server or CLI started by a module fixture inherits the environment of that moment."""
    pytester.makeconftest(CONFTEST.read_text(encoding="utf-8"))
    pytester.makepyfile(
        test_child=f"""
        import json, subprocess, sys

        import pytest

        NAMES = {sorted(machine)!r}


        @pytest.fixture(scope="module")
        def child():
            code = "import json, os, sys; print(json.dumps(sorted(n for n in os.environ if n in sys.argv[1:])))"
            return json.loads(subprocess.run([sys.executable, "-c", code, *NAMES], capture_output=True).stdout)


        def test_it(child):
            assert child == []
        """
    )
    result = pytester.runpytest_inprocess(*other_plugins_off(), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


NOISY_PLUGIN = """
import warnings

import pytest


def pytest_configure(config):
    warnings.warn(pytest.PytestDeprecationWarning("a plugin installed beside ours warns at configure"))


@pytest.fixture(autouse=True)
def _noisy_fixture():
    raise RuntimeError("a plugin installed beside ours broke this test")
"""


@pytest.fixture
def noisy_plugin_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A pytest plugin installed by entry point (as pytest-asyncio is: it warns at configure when its loop scope is
    unset), on sys.path for this test only."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "noisy_plugin_xyz.py").write_text(NOISY_PLUGIN)
    info = site / "noisy_plugin_xyz-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: noisy-plugin-xyz\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[pytest11]\nnoisy_xyz = noisy_plugin_xyz\n")
    monkeypatch.syspath_prepend(str(site))
    import importlib

    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, "noisy_plugin_xyz", raising=False)
    return "noisy_xyz"


def test_a_pytester_run_is_not_decided_by_plugins_installed_beside_ours(
    pytester: pytest.Pytester, noisy_plugin_installed: str, other_plugins_off: Callable[..., list[str]]
) -> None:
    pytester.makepyfile(
        """
        import pytest

        pytestmark = pytest.mark.anyio


        async def test_it(fake_lago, lago_client):
            fake_lago.add_plan("starter")
            await lago_client.create_subscription(
                external_customer_id="org_1", plan_code="starter", external_id="org_1"
            )
            assert fake_lago.customers[0]["external_id"] == "org_1"
        """
    )
    arguments = other_plugins_off()
    assert f"no:{noisy_plugin_installed}" in arguments
    assert "no:lago_org_billing" not in arguments and "no:anyio" not in arguments
    result = pytester.runpytest_inprocess(*arguments, "-W", "error", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()  # (one per anyio backend)
    assert outcomes.get("passed", 0) >= 1 and set(outcomes) <= {"passed", "seconds"}, outcomes
    # the plugin is there, and decides the outcome of a run that keeps it (as pytest-asyncio's warning did)
    failed = pytester.runpytest_inprocess(
        *other_plugins_off(noisy_plugin_installed), "-W", "error", "-p", "no:cacheprovider"
    )
    assert failed.ret == pytest.ExitCode.INTERNAL_ERROR
    assert "a plugin installed beside ours warns at configure" in failed.stderr.str()


DOTENV_READERS = """
    import pytest

    from lago_org_billing import BillingSettings, QuotaConfig


    @pytest.fixture(scope="module")
    def module_settings():
        return BillingSettings.from_env(require_api_key=False)


    def test_a_module_fixture_reads_no_dotenv(module_settings):
        assert not module_settings.api_key and module_settings.spool_path is None


    def test_defaults_without_a_dotenv():
        assert QuotaConfig.from_env().over_quota_status == 429
        assert BillingSettings.from_env(require_api_key=False).quota_mode == "enforce"


    def test_a_test_about_dotenv_still_reads_its_own(tmp_path, monkeypatch):
        (tmp_path / ".env").write_text("LAGO_QUOTA_STATUS=402\\n")
        monkeypatch.chdir(tmp_path)
        assert QuotaConfig.from_env().over_quota_status == 402
"""


def test_a_developers_dotenv_where_pytest_starts_is_not_read(
    pytester: pytest.Pytester, other_plugins_off: Callable[..., list[str]]
) -> None:
    """``pytest`` started in a project's root, where its ``.env`` is (the README tells users to write one): every
    ``QuotaGate()``, ``BillingSettings.from_env()``, CLI command and middleware made without settings read it (28 tests
    failed with a ``.env`` of LAGO_QUOTA_STATUS=402, LAGO_QUOTA_MODE=monitor, LAGO_SPOOL_PATH...)."""
    pytester.makeconftest(CONFTEST.read_text(encoding="utf-8"))
    (pytester.path / ".env").write_text(
        "LAGO_API_KEY=developer-key\nLAGO_QUOTA_STATUS=402\nLAGO_QUOTA_MODE=monitor\nLAGO_SPOOL_PATH=/dev/spool.db\n"
    )
    pytester.makepyfile(test_dotenv=textwrap.dedent(DOTENV_READERS))
    result = pytester.runpytest_inprocess(*other_plugins_off(), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert Path.cwd() == pytester.path  # (given back when the run ends)


ANYIO_TESTS = """
    import pytest
    import sniffio

    pytestmark = pytest.mark.anyio


    @pytest.mark.parametrize("anyio_backend", ["trio"])
    async def test_on_trio():
        assert sniffio.current_async_library() == "trio"


    async def test_on_asyncio():
        assert sniffio.current_async_library() == "asyncio"


    def test_pytest_asyncio_is_in_strict_mode(pytestconfig):
        # (in auto mode it ran the async fixtures of test_quota_rollover.py on a loop of its own)
        assert pytestconfig.getoption("asyncio_mode") == "strict"
"""


def test_pytest_asyncio_in_auto_mode_leaves_the_suites_async_tests_to_anyio(
    pytester: pytest.Pytester, other_plugins_off: Callable[..., list[str]]
) -> None:
    """pytest-asyncio installed and ``asyncio_mode=auto`` set by the developer (PYTEST_ADDOPTS): it ran this suite's
    async fixtures on a loop of its own (redis gates closed on it: "Event loop is closed", at 45 teardowns) and a
    ``[trio]`` test on asyncio (test_idempotency_redis_trio.py passed or failed for the wrong reason)."""
    pytest.importorskip("pytest_asyncio")
    pytester.makeconftest(CONFTEST.read_text(encoding="utf-8"))
    pytester.makepyfile(test_libraries=textwrap.dedent(ANYIO_TESTS))
    mode = ("-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function")
    result = pytester.runpytest_inprocess(*other_plugins_off("asyncio"), *mode, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
