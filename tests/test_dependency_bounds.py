"""The lower bounds pyproject.toml declares are ones the code runs with.

Each row is an API (or a fix) the code relies on, the first release of the distribution that has it, the part of
the package that needs it, and a marker that the code still uses it (so that a row whose need went away fails here
and gets removed instead of keeping a bound for nothing). The versions were found by running the test subsets
against those releases in scratch virtual environments.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

NEEDS = [
    pytest.param(
        "anyio",
        "4.11",
        "testing",
        "src/lago_org_billing/testing/_webhooks.py",
        "anyio.from_thread.run_sync(self._set_wake, token=token)",
        # anyio < 4.11: a webhook emitted from the test thread while the emulator is served (fake_lago_server, the
        # `emulator` and `demo` commands) raised TypeError: run_sync() got an unexpected keyword argument 'token'.
        id="anyio-from_thread-token",
    ),
    pytest.param(
        "redis",
        "5.0.2",
        "redis",
        "src/lago_org_billing/_quota_redis.py",
        "redis_asyncio.Redis.from_pool(pool)",
        # redis 5.0.0: AttributeError: type object 'Redis' has no attribute 'from_pool' (no Redis gate at all);
        # 5.0.1: the app served on a second event loop failed its requests with RuntimeError: <asyncio.locks.Lock>
        # is bound to a different event loop.
        id="redis-from_pool-and-loops",
    ),
    pytest.param(
        "prometheus-client",
        "0.26",
        "dev",
        "tests/test_metrics_multiprocess.py",
        "value_class.close_all_files()",
        # prometheus-client < 0.26: every multiprocess test errors with AttributeError: type object 'MmapedValue'
        # has no attribute 'close_all_files'.
        id="prometheus-close_all_files",
    ),
    pytest.param(
        "starlette",
        "0.46",
        "dev",
        "tests/test_middleware.py",
        'with pytest.raises(ConfigurationError, match="LAGO_API_KEY"):\n        with TestClient(app):',
        # starlette < 0.46: TestClient leaves its lifespan streams unclosed when the startup fails; with
        # filterwarnings=error their ResourceWarning fails whichever later test the garbage collector runs in
        # (and starlette < 0.37.2 passes httpx's deprecated app= shortcut: DeprecationWarning in every TestClient).
        id="starlette-testclient",
    ),
]


def _project() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        project: dict[str, object] = tomllib.load(file)["project"]
    return project


def _requirements(extra: str) -> list[Requirement]:
    """What installing ``lago-org-billing[extra]`` asks for (the extras it names included)."""
    project = _project()
    extras: dict[str, list[str]] = project["optional-dependencies"]  # type: ignore[assignment]
    found = [Requirement(text) for text in project["dependencies"]]  # type: ignore[attr-defined]
    pending, seen = [extra], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in extras[name]:
            requirement = Requirement(text)
            if requirement.name == "lago-org-billing":
                pending.extend(requirement.extras)
            else:
                found.append(requirement)
    return found


def _floor(requirements: list[Requirement], name: str) -> Version | None:
    """The highest lower bound any of ``requirements`` puts on ``name`` (None when none does)."""
    floors = [
        Version(spec.version)
        for requirement in requirements
        if requirement.name.lower().replace("_", "-") == name
        for spec in requirement.specifier
        if spec.operator in (">=", "==", "~=", ">")
    ]
    return max(floors, default=None)


@pytest.mark.parametrize(("name", "minimum", "extra", "where", "marker"), NEEDS)
def test_declared_lower_bounds_cover_what_the_code_uses(
    name: str, minimum: str, extra: str, where: str, marker: str
) -> None:
    assert marker in (ROOT / where).read_text(encoding="utf-8"), f"{where} no longer needs {name}>={minimum}"
    floor = _floor(_requirements(extra), name)
    assert floor is not None and floor >= Version(minimum), (
        f"lago-org-billing[{extra}] allows {name} {floor or 'any'} but {where} needs {name}>={minimum}"
    )
