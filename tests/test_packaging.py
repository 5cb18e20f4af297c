"""The package as a user installs it: from the built wheel (and the sdist), not from this editable checkout.

The wheel and the sdist are built once for the module with hatchling, in process and offline (``hatchling`` is in
the ``dev`` extra; without it the module skips rather than fetch it from the network). The wheel is then unpacked
(``pip install --no-deps --target`` does nothing more for a pure wheel) into a directory that comes first on
``PYTHONPATH``, so subprocesses import the installed copy, from a working directory outside the checkout, with the
dependencies of this environment.
"""

from __future__ import annotations

import email.message
import email.parser
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import lago_org_billing

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "lago_org_billing"
NAME = "lago_org_billing"

# The extras' imports, none of which the base install has.
OPTIONAL_MODULES = ("jwt", "cryptography", "redis", "prometheus_client", "uvicorn", "trio")

_BUILD = (
    "import sys\n"
    "from hatchling.build import build_sdist, build_wheel\n"
    "print((build_wheel if sys.argv[1] == 'wheel' else build_sdist)(sys.argv[2]))\n"
)

# Run first in a subprocess: makes the optional dependencies unimportable, as on a base install.
_BLOCK_EXTRAS = textwrap.dedent(
    f"""
    import sys

    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {OPTIONAL_MODULES!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _Blocker())
    """
)


def _build(kind: str, source: Path, out: Path) -> Path:
    done = subprocess.run(
        [sys.executable, "-c", _BUILD, kind, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(wheel, sdist) built from the checkout."""
    pytest.importorskip("hatchling.build", reason="building offline needs hatchling (pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("dist")
    return _build("wheel", ROOT, out), _build("sdist", ROOT, out)


@pytest.fixture(scope="module")
def wheel_names(dist: tuple[Path, Path]) -> list[str]:
    with zipfile.ZipFile(dist[0]) as archive:
        return archive.namelist()


def _dist_info(names: list[str]) -> str:
    (info,) = {name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info")}
    return info


@pytest.fixture(scope="module")
def metadata(dist: tuple[Path, Path], wheel_names: list[str]) -> email.message.Message:
    with zipfile.ZipFile(dist[0]) as archive:
        text = archive.read(f"{_dist_info(wheel_names)}/METADATA").decode()
    return email.parser.Parser().parsestr(text)


@pytest.fixture(scope="module")
def installed(dist: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed (unpacked) into a directory of its own."""
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(dist[0]) as archive:
        archive.extractall(target)
    return target


def _run_installed(
    installed: Path, cwd: Path, code: str, *args: str, block_extras: bool = False, guard: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAGO_", "PYTEST_", "COV_"))}
    env["PYTHONPATH"] = str(installed)
    env.pop("PYTHONSAFEPATH", None)
    prologue = _BLOCK_EXTRAS if block_extras else ""
    if guard:  # (the installed copy is the one imported)
        prologue += f"import lago_org_billing as _p\nassert _p.__file__.startswith({str(installed)!r}), _p.__file__\n"
    return subprocess.run(
        [sys.executable, "-c", prologue + code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --------------------------------------------------------------------------- what the wheel holds


def test_wheel_holds_the_package_and_py_typed_and_nothing_else(wheel_names: list[str]) -> None:
    """Every module of ``src/`` and ``py.typed``; no tests, OpenAPI spec, examples, benchmarks or bytecode."""
    info = _dist_info(wheel_names)
    shipped = {name for name in wheel_names if not name.startswith(f"{info}/")}
    expected = {
        f"{NAME}/{path.relative_to(SRC).as_posix()}"
        for path in SRC.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".typed")
    }
    assert f"{NAME}/py.typed" in shipped
    assert shipped == expected
    assert not [name for name in wheel_names if name.endswith((".yaml", ".pyc", ".json"))]


def test_wheel_metadata_matches_the_package(metadata: email.message.Message) -> None:
    assert metadata["Name"] == "lago-org-billing"
    assert metadata["Version"] == lago_org_billing.__version__
    assert metadata["Requires-Python"] == ">=3.10"
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert "lago-org-billing" in metadata.get_payload()  # the README is the long description
    assert "Typing :: Typed" in metadata.get_all("Classifier", [])
    requires = {Requirement(text).name for text in metadata.get_all("Requires-Dist", []) if "extra ==" not in text}
    assert {"starlette", "httpx", "anyio", "cachetools"} <= requires


def test_wheel_ships_the_license_text(dist: tuple[Path, Path], wheel_names: list[str]) -> None:
    """MIT asks that its notice go with every copy: the wheel (and the sdist) carry the text, not just its name."""
    info = _dist_info(wheel_names)
    licenses = [name for name in wheel_names if name.startswith(f"{info}/licenses/")]
    assert licenses, "no license file in the wheel"
    with zipfile.ZipFile(dist[0]) as archive:
        text = archive.read(licenses[0]).decode()
    assert "Permission is hereby granted, free of charge" in text
    with tarfile.open(dist[1]) as sdist:
        assert any(Path(member).name.startswith("LICENSE") for member in sdist.getnames())


def test_classifiers_follow_requires_python_and_name_the_pytest_plugin(metadata: email.message.Message) -> None:
    """The minor versions classified are those ``Requires-Python`` lets install (3.10 included); the pytest11 entry
    point is announced with ``Framework :: Pytest`` (how PyPI users, and pytest's plugin list, find plugins)."""
    classifiers = metadata.get_all("Classifier", [])
    pattern = re.compile(r"Programming Language :: Python :: (3\.\d+)")
    versions = [m.group(1) for c in classifiers if (m := pattern.fullmatch(c))]
    assert "3.10" in versions
    allowed = SpecifierSet(metadata["Requires-Python"])
    assert all(allowed.contains(f"{v}.0") for v in versions), versions
    assert "Framework :: Pytest" in classifiers


def test_extras_are_the_ones_the_readme_names(metadata: email.message.Message) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    extras = set(metadata.get_all("Provides-Extra", []))
    assert extras == {"webhooks", "testing", "redis", "metrics", "dev"}
    for extra in extras - {"dev"}:
        assert f"`{extra}`" in readme, extra
    # What the README's Quickstart installs and runs: the demo serves the emulator (uvicorn), signs webhooks (JWT).
    testing = {Requirement(t).name for t in metadata.get_all("Requires-Dist", []) if "extra == 'testing'" in t}
    assert {"uvicorn", "pyjwt"} <= testing


def test_windows_installs_get_a_time_zone_database(metadata: email.message.Message) -> None:
    """Without ``tzdata`` Windows has no zone database: ``OrgBilling.create_subscription(subscription_at=date)``
    would start an America/New_York org's subscription at 00:00 UTC (19:00 the day before, there) and the emulator
    would count every customer's billing period in UTC. Linux and macOS have the system's database."""
    tzdata = [Requirement(t) for t in metadata.get_all("Requires-Dist", []) if Requirement(t).name == "tzdata"]
    assert tzdata, "tzdata is not a dependency"
    marker = tzdata[0].marker or Marker("python_version > '0'")
    assert marker.evaluate({"sys_platform": "win32", "extra": ""})
    assert not marker.evaluate({"sys_platform": "linux", "extra": ""})


def test_entry_points_name_what_the_wheel_ships(dist: tuple[Path, Path], wheel_names: list[str]) -> None:
    with zipfile.ZipFile(dist[0]) as archive:
        text = archive.read(f"{_dist_info(wheel_names)}/entry_points.txt").decode()
    assert "lago-org-billing = lago_org_billing.cli:main" in text
    assert "lago_org_billing = lago_org_billing.testing.pytest_plugin" in text
    assert f"{NAME}/cli.py" in wheel_names
    assert f"{NAME}/testing/pytest_plugin.py" in wheel_names


def test_sdist_builds_the_same_wheel_again(dist: tuple[Path, Path], tmp_path: Path, wheel_names: list[str]) -> None:
    with tarfile.open(dist[1]) as sdist:
        sdist.extractall(tmp_path / "src", filter="data")
    (source,) = (tmp_path / "src").iterdir()
    for needed in ("pyproject.toml", "README.md", "src/lago_org_billing/py.typed", "src/lago_org_billing/_version.py"):
        assert (source / needed).is_file(), needed
    rebuilt = _build("wheel", source, tmp_path)
    with zipfile.ZipFile(rebuilt) as again, zipfile.ZipFile(dist[0]) as first:
        assert sorted(again.namelist()) == sorted(wheel_names)
        info = _dist_info(wheel_names)
        assert again.read(f"{info}/METADATA") == first.read(f"{info}/METADATA")


# --------------------------------------------------------------------------- the installed wheel, base dependencies


def test_installed_wheel_imports_every_module_with_the_base_dependencies(installed: Path, tmp_path: Path) -> None:
    """jwt, cryptography, redis, prometheus_client, uvicorn and trio unimportable: every module still imports."""
    done = _run_installed(
        installed,
        tmp_path,
        textwrap.dedent(
            """
            import importlib, pkgutil, lago_org_billing
            for module in pkgutil.walk_packages(lago_org_billing.__path__, "lago_org_billing."):
                importlib.import_module(module.name)
            print("imported")
            """
        ),
        block_extras=True,
    )
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout


def test_installed_cli_without_the_testing_extra_says_which_extra(installed: Path, tmp_path: Path) -> None:
    code = "import sys\nfrom lago_org_billing.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    for args in (["--help"], ["emulator", "--help"], ["migrate", "--help"], ["dead-letters", "--help"]):
        done = _run_installed(installed, tmp_path, code, *args, block_extras=True)
        assert done.returncode == 0, (args, done.stderr)
        assert "usage: lago-org-billing" in done.stdout
    done = _run_installed(installed, tmp_path, code, "demo", block_extras=True)
    assert done.returncode == 2
    assert "pip install 'lago-org-billing[testing]'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_installed_demo_runs_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    """``lago-org-billing demo`` from the wheel, in an empty directory: it ends by itself and prints its report."""
    code = "import sys\nfrom lago_org_billing.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    done = _run_installed(installed, tmp_path, code, "demo")
    assert done.returncode == 0, done.stderr
    assert "Every request billed exactly once" in done.stdout


def test_installed_pytest_plugin_is_registered_in_a_fresh_project(installed: Path, tmp_path: Path) -> None:
    """The README's test, in a project of its own with only the wheel: ``fake_lago`` and ``lago_client`` come from
    the wheel's pytest11 entry point (no conftest, no ``-p``)."""
    (tmp_path / "test_readme.py").write_text(
        textwrap.dedent(
            f"""
            import pytest
            import lago_org_billing
            from lago_org_billing import LagoClient

            pytestmark = pytest.mark.anyio
            INSTALLED = {str(installed)!r}


            @pytest.fixture
            def anyio_backend():
                return "asyncio"


            def test_the_wheel_is_what_runs():
                assert lago_org_billing.__file__.startswith(INSTALLED), lago_org_billing.__file__


            async def test_customer(fake_lago, lago_client: LagoClient):
                fake_lago.add_plan("starter", amount_cents=1000)
                await lago_client.create_subscription(
                    external_customer_id="org_1", plan_code="starter", external_id="org_1"
                )
                assert fake_lago.customers[0]["external_id"] == "org_1"
            """
        )
    )
    code = "import sys, pytest\nsys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-W', 'error', *sys.argv[1:]]))"
    done = _run_installed(installed, tmp_path, code, "test_readme.py", guard=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


# --------------------------------------------------------------------------- the fixtures without the extras


@pytest.fixture
def without_extras(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """jwt and cryptography unimportable, as with ``pip install lago-org-billing`` (no extra) plus pytest."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("jwt", "cryptography"):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "jwt", None)
    monkeypatch.setitem(sys.modules, "cryptography", None)
    yield


def test_fake_lago_fixture_needs_no_extra(without_extras: None, request: pytest.FixtureRequest) -> None:
    """The in-process fixtures come with the base package (only ``fake_lago_server`` needs ``[testing]``): the
    README's first test must not fail with ``ModuleNotFoundError: No module named 'cryptography'``, nor should
    each ``fake_lago`` pay for a 2048-bit RSA key it does not use (~50 ms of CPU per test)."""
    fake_lago: Any = request.getfixturevalue("fake_lago")
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_subscription("org_1", "starter", external_id="org_1")
    assert fake_lago.faults is not None
    assert fake_lago.webhook_dispatcher is not None
    assert [s["external_id"] for s in fake_lago.subscriptions] == ["org_1"]


def test_emulator_signing_key_without_the_extra_says_which_extra(without_extras: None) -> None:
    """JWT webhooks (Lago's default) need the ``testing`` extra: the emulator says so as its webhooks module does,
    instead of ``ModuleNotFoundError: No module named 'cryptography'``."""
    from lago_org_billing import LagoIntegrationError
    from lago_org_billing.testing import FakeLago

    with pytest.raises(LagoIntegrationError, match=re.escape("lago-org-billing[testing]")):
        _ = FakeLago().rsa_public_key_pem
