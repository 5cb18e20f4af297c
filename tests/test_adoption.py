"""Adopting the package: malformed LAGO_REDIS_URL and LAGO_API_URL values refused naming the variable (an endpoint's
URL too), quota status errors carry their variable, mapping files with numeric ids, the migration names the README
shows importable, and the emulator command saying its address only when it can serve it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from lago_org_billing import BillingSettings, ConfigurationError, OrgBillingMiddleware, QuotaConfig
from lago_org_billing.cli import main


@pytest.fixture(autouse=True)
def _no_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run where no stray .env can feed settings."""
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------------------------------ LAGO_REDIS_URL


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:notaport",  # a typo'd port: accepted, then redis-py's raw ValueError at startup
        "redis://localhost:99999",  # out of range: accepted (LAGO_API_URL refuses the same port)
        "redis://[::1",  # unbalanced IPv6 bracket: a raw ValueError("Invalid IPv6 URL") from urlsplit
    ],
)
def test_malformed_redis_url_is_a_configuration_error_naming_the_variable(url: str) -> None:
    """README: "A malformed value is a ConfigurationError naming the variable"."""
    with pytest.raises(ConfigurationError) as info:
        BillingSettings.from_env(None, environ={"LAGO_API_KEY": "k", "LAGO_REDIS_URL": url})
    assert info.value.variable == "LAGO_REDIS_URL"
    assert "LAGO_REDIS_URL" in str(info.value)


def test_app_startup_with_a_bad_redis_port_says_which_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """What uvicorn prints at startup is the error: today "ValueError: Port could not be cast to integer value as
    'notaport'", which names neither LAGO_REDIS_URL nor the fix."""
    monkeypatch.setenv("LAGO_API_KEY", "k")
    monkeypatch.setenv("LAGO_REDIS_URL", "redis://localhost:notaport")

    async def endpoint(request: Any) -> JSONResponse:
        return JSONResponse({})

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(OrgBillingMiddleware)
    with pytest.raises(ConfigurationError, match="LAGO_REDIS_URL"):
        with TestClient(app):
            pass


# ------------------------------------------------------------------------------------------ LAGO_API_URL


def test_api_url_with_unbalanced_ipv6_bracket_is_a_configuration_error() -> None:
    """urlsplit raises a bare ValueError, not a LagoIntegrationError (the contract's base of every error)."""
    with pytest.raises(ConfigurationError) as info:
        BillingSettings.from_env(None, environ={"LAGO_API_KEY": "k", "LAGO_API_URL": "http://[::1"})
    assert info.value.variable == "LAGO_API_URL"


def test_health_cli_with_unbalanced_ipv6_api_url_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lago-org-billing health` prints a Python traceback instead of `error: LAGO_API_URL ...` (exit 2)."""
    monkeypatch.setenv("LAGO_API_KEY", "k")
    monkeypatch.setenv("LAGO_API_URL", "http://[::1")
    assert main(["health"]) == 2
    assert "LAGO_API_URL" in capsys.readouterr().err


@pytest.mark.parametrize(
    "url",
    ["https://api.getlago.com/api/v1/events", "http://localhost:3000/api/v1/customers/"],
)
def test_api_url_pointing_at_a_lago_endpoint_is_refused(url: str) -> None:
    """The contract: LAGO_API_URL is the base URL "without /api/v1"; a trailing /api/v1 is stripped. A URL with an
    endpoint after /api/v1 (pasted from Lago's API docs) is kept as is: every call then goes to
    .../api/v1/events/api/v1/..., and `health` says "Check the id (Lago's ids are case-sensitive)", not the URL."""
    with pytest.raises(ConfigurationError) as info:
        BillingSettings.from_env(None, environ={"LAGO_API_KEY": "k", "LAGO_API_URL": url})
    assert info.value.variable == "LAGO_API_URL"


# ------------------------------------------------------------------------------------------ LAGO_QUOTA_*


@pytest.mark.parametrize(
    ("variable", "value"),
    [("LAGO_QUOTA_STATUS", "abc"), ("LAGO_QUOTA_NO_SUBSCRIPTION_STATUS", "forbidden")],
)
def test_quota_status_errors_carry_their_variable(variable: str, value: str) -> None:
    """Every other malformed LAGO_* value sets ConfigurationError.variable; these two leave it None."""
    with pytest.raises(ConfigurationError) as info:
        QuotaConfig.from_env(environ={variable: value})
    assert info.value.variable == variable


# ------------------------------------------------------------------------------------------ migrate mapping


def test_json_mapping_with_a_numeric_user_id_is_not_called_empty() -> None:
    """A JSON mapping exported from a database with integer ids gets two problems for one field: "user_id must be
    a string, got 42" and the wrong "empty user_id"."""
    from lago_org_billing._migration import MappingError, build_mapping

    record = {"user_id": 42, "org_id": "org_a", "org_name": "A", "email": "a@a.test"}
    with pytest.raises(MappingError) as info:
        build_mapping([("map.json item 1", record)], BillingSettings(api_key="k"))
    problems = info.value.problems
    assert any("user_id must be a string" in p for p in problems)
    assert not any("empty user_id" in p for p in problems), problems


# ------------------------------------------------------------------------------------------ README names / CLI


def test_migration_names_the_readme_tells_users_to_call_are_public() -> None:
    """README (CLI > migrate): "from Python, `run_migration(journal=...)` takes no lock: hold `JournalLock(path)`
    around `Journal(path)` and the run". None of the three can be imported but from the private `_migration`."""
    import lago_org_billing

    missing = [name for name in ("run_migration", "Journal", "JournalLock") if not hasattr(lago_org_billing, name)]
    assert not missing, f"README names {missing} but `from lago_org_billing import ...` cannot reach them"


def test_emulator_without_uvicorn_does_not_announce_an_address_first(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the `testing` extra, `lago-org-billing emulator` prints "Lago emulator on http://... export
    LAGO_API_URL=..." on stdout and only then "error: ... needs uvicorn" (exit 2): a script reading the banner
    waits on an address nothing serves."""
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["emulator", "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert "uvicorn" in err
    assert "Lago emulator on" not in out, out
