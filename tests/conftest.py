from __future__ import annotations

import datetime as dt
import importlib.metadata
import ipaddress
import os
import shutil
import signal
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio."""
    return "asyncio"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway redis-server on 127.0.0.1 for the module (skipped when not installed; .ci/run installs it)."""
    from _quota_app import REDIS_SERVER, redis_server

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


#: Variables of the machine the suite runs on that lago-org-billing (or httpx, requests, redis-py under it) reads: a
#: developer's shell (LAGO_API_KEY, LAGO_REDIS_URL...), a corporate CI's proxy (every request to the emulator on
#: 127.0.0.1 sent to it), a CA bundle, a metrics directory. Tests that are about one of them set it themselves.
_MACHINE_VARIABLES = frozenset(
    {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ssl_cert_file", "ssl_cert_dir", "prometheus_multiproc_dir"}
)
_ENVIRON_KEY = pytest.StashKey[pytest.MonkeyPatch]()
_SIGINT_KEY = pytest.StashKey[object]()


def _of_the_machine(name: str) -> bool:
    return name.startswith("LAGO_") or name.lower() in _MACHINE_VARIABLES


def pytest_configure(config: pytest.Config) -> None:
    """Removed for the whole run, before any module is collected: a function-scoped fixture came too late for module
    and session fixtures (which ran migrations, servers and subprocesses with the developer's LAGO_* variables) and
    put them back after each test. Restored when the run ends (``pytest.main()`` called twice in one process)."""
    environ = pytest.MonkeyPatch()
    for name in [name for name in os.environ if _of_the_machine(name)]:
        environ.delenv(name)
    config.stash[_ENVIRON_KEY] = environ
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started in the background by a shell without job control (``pytest &``, a CI step's ``nohup``): SIGINT is
        # ignored, in this process and in every child it starts, and the tests of Ctrl-C (the demo's, the migration's
        # in a subprocess) saw none. Python's handler here: children start with the default again (a handler is not
        # inherited across exec, an ignored signal is).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        config.stash[_SIGINT_KEY] = signal.SIG_IGN
    if hasattr(config.option, "asyncio_mode"):
        # pytest-asyncio installed beside us, maybe in auto mode (``-o asyncio_mode=auto``, PYTEST_ADDOPTS): it took
        # this suite's async fixtures and anyio tests (a [trio] test ran on asyncio; gates made on anyio's loop were
        # closed on its own: "Event loop is closed"). Every async test and fixture here is anyio's: strict mode
        # leaves them to anyio.
        config.option.asyncio_mode = "strict"


def _sendable(text: str) -> str:
    """``text`` as UTF-8 can carry it: a lone surrogate (what many tests here feed the package, and its logs repeat)
    written as its escape."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under pytest-xdist (``-n``): a worker sends each report to the controller as UTF-8, and a captured log or a
    failure holding a lone surrogate crashed the worker ("surrogates not allowed") and ended the run. Escaped there."""
    report: pytest.TestReport = yield
    if hasattr(item.config, "workerinput"):
        report.sections = [(title, _sendable(content)) for title, content in report.sections]
        if report.longrepr is not None and not isinstance(report.longrepr, tuple):
            text = str(report.longrepr)
            if _sendable(text) is not text:
                report.longrepr = _sendable(text)
    return report


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(_SIGINT_KEY, None) is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    environ = config.stash.get(_ENVIRON_KEY, None)
    if environ is not None:
        environ.undo()


@pytest.fixture(scope="session", autouse=True)
def _empty_working_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tests (and module fixtures) run in an empty directory, not where pytest was started: a developer's ``.env``
    there (a project's root) was read by every ``QuotaGate()``, CLI command and middleware made without settings
    (``QuotaConfig.from_env()``, ``BillingSettings.from_env()``). A test about ``.env`` files chdirs to its own
    ``tmp_path``. The starting directory is back before pytest's summary (reports written where asked)."""
    directory = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        yield directory


@pytest.fixture(autouse=True)
def _clean_lago_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests never see LAGO_* variables (or proxies...) left by another test that set them without monkeypatch."""
    for name in [name for name in os.environ if _of_the_machine(name)]:
        monkeypatch.delenv(name)
    yield


#: The pytest11 entry points a project run by ``pytester`` keeps: the emulator's fixtures and anyio's runner.
_OWN_PLUGINS = frozenset({"lago_org_billing", "anyio"})


@pytest.fixture
def other_plugins_off() -> Callable[..., list[str]]:
    """``-p no:<name>`` for each pytest plugin installed beside ours (pytest-asyncio, pytest-randomly, pytest-benchmark,
    typeguard, hypothesis...), to pass to ``pytester.runpytest_*``: a user's project run by pytester loads every
    installed plugin, and pytest-asyncio's warning of an unset loop scope failed those runs under -W error (and
    pytest-randomly reordered tests about the order). Autoload stays on, so our plugin is still loaded by its entry
    point. ``other_plugins_off("xdist")`` keeps xdist's too."""

    def arguments(*keep: str) -> list[str]:
        installed = {entry.name for entry in importlib.metadata.entry_points(group="pytest11")}
        return [part for name in sorted(installed - _OWN_PLUGINS - set(keep)) for part in ("-p", f"no:{name}")]

    return arguments


@pytest.fixture
def header_settings(fake_lago: Any) -> Any:
    """``BillingSettings`` for an app billing org_a (subscribed to a free plan) on the ``fake_lago`` emulator: org and
    user from the X-Org-Id and X-User-Id headers, no quota gate, quick retries."""
    from lago_org_billing import BillingSettings

    fake_lago.add_plan("starter", amount_cents=0)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    return BillingSettings(
        api_url=fake_lago.base_url,
        api_key=fake_lago.api_key,
        org_header="X-Org-Id",
        user_header="X-User-Id",
        quota_mode="off",
        retry_backoff=0.001,
    )


@pytest.fixture
def tls_files(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    yield cert_file, key_file


@pytest.fixture
def no_write_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed spool write is tried again at the next commit window (the tests count outcomes, not pauses)."""
    from lago_org_billing import _spool

    monkeypatch.setattr(_spool, "_RETRY_FIRST", 0.0)
    monkeypatch.setattr(_spool, "_RETRY_MAX", 0.0)


@pytest.fixture(
    params=[
        "memory",
        pytest.param(
            "redis",
            marks=pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
        ),
    ]
)
def redis(request: pytest.FixtureRequest) -> str | None:
    """The quota backend a test runs on: ``None`` (in process), or the URL of a throwaway redis-server."""
    return request.getfixturevalue("redis_url") if request.param == "redis" else None


@pytest.fixture
def busy_threads() -> Iterator[None]:
    """Threads switch as often as the interpreter allows (as under a loaded thread pool)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)
