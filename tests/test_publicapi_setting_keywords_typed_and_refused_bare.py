"""The keywords of ``BillingSettings.replace``, ``BillingSettings.from_env`` and ``QuotaConfig.from_env``: typed for
a user's type checker (they were ``**Any``: ``replace(api_timout=3)`` passed ``mypy --strict``), a misspelt one a
``ConfigurationError`` naming the setting meant, and the errors of ``QuotaConfig.from_env`` raised without the frames
that held the whole environment (the API key among their locals, shipped by Sentry, ``rich`` and loguru)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.requests import Request

import lago_org_billing
from lago_org_billing import BillingSettings, ConfigurationError, QuotaConfig, attribute_usage
from lago_org_billing._attribution import reset_warnings
from lago_org_billing._quota import QuotaConfigFields
from lago_org_billing._settings import SettingsFields

KEY = "sk_live_PUBLICAPISECRET_41d"
HMAC_KEY = "whsec_PUBLICAPIHMAC_77"


def _locals_shown(exc: BaseException) -> Iterator[str]:
    """The repr of every local of every frame of the tracebacks of ``exc`` and its chain, but this file's frames
    (which hold the secrets they passed), as an error tracker shows them."""
    todo: list[BaseException | None] = [exc]
    seen: list[BaseException] = []
    while todo:
        error = todo.pop()
        if error is None or any(error is known for known in seen):
            continue
        seen.append(error)
        todo += [error.__cause__, error.__context__]
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename != __file__:
                for value in list(tb.tb_frame.f_locals.values()):
                    try:
                        yield repr(value)
                    except Exception:  # (a half-made object's repr)
                        continue
            tb = tb.tb_next


def _leaks(exc: BaseException) -> list[str]:
    return [shown[:160] for shown in _locals_shown(exc) if KEY in shown or HMAC_KEY in shown]


@pytest.mark.parametrize(
    ("variable", "value"),
    [("LAGO_QUOTA_STATUS", "500"), ("LAGO_QUOTA_STATUS", "abc"), ("LAGO_QUOTA_COLD_TIMEOUT", "soon")],
)
def test_quota_config_refused_from_the_environment_keeps_secrets_out_of_the_traceback(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``QuotaConfig.from_env()`` (what the middleware calls at its first start) refusing a ``LAGO_QUOTA_*`` value:
    its frame had ``os.environ`` and a copy of it as locals, every secret of the deployment in a crash report at
    startup (``BillingSettings.from_env`` already raised its errors bare)."""
    monkeypatch.setenv("LAGO_API_KEY", KEY)
    monkeypatch.setenv("LAGO_WEBHOOK_HMAC_KEY", HMAC_KEY)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=variable) as info:
        QuotaConfig.from_env(env_file=None)
    assert info.value.variable == variable
    assert _leaks(info.value) == []
    with pytest.raises(ConfigurationError, match=variable) as info:  # the environment given as a mapping
        QuotaConfig.from_env({"LAGO_API_KEY": KEY, variable: value})
    assert _leaks(info.value) == []


def test_a_misspelt_setting_names_the_one_meant_without_secrets_in_the_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A keyword that names no setting was a ``TypeError`` from the dataclass' ``__init__``, raised through
    ``from_env``'s frames: the whole environment and the API key among their locals. It is a ``ConfigurationError``
    naming the setting meant, still a ``TypeError``, raised bare."""
    monkeypatch.setenv("LAGO_API_KEY", KEY)
    monkeypatch.setenv("LAGO_WEBHOOK_HMAC_KEY", HMAC_KEY)
    settings = BillingSettings(api_key=KEY)
    for make in (
        lambda: BillingSettings.from_env(None, api_timout=3),  # type: ignore[call-arg]
        lambda: BillingSettings.from_env(None, environ={"LAGO_API_KEY": KEY}, api_timout=3),  # type: ignore[call-arg]
        lambda: settings.replace(api_timout=3),  # type: ignore[call-arg]
        lambda: BillingSettings(api_key=KEY, webhook_hmac_key=HMAC_KEY, api_timout=3),  # type: ignore[call-arg]
    ):
        with pytest.raises(ConfigurationError, match="no setting 'api_timout': did you mean 'api_timeout'") as info:
            make()
        assert isinstance(info.value, TypeError)  # (what Python raises for an unexpected keyword: caught as before)
        assert _leaks(info.value) == []
    with pytest.raises(ConfigurationError, match="'cold_timout': did you mean 'cold_timeout'") as info:
        QuotaConfig.from_env(env_file=None, cold_timout=3)  # type: ignore[call-arg]
    assert isinstance(info.value, TypeError) and _leaks(info.value) == []
    with pytest.raises(ConfigurationError, match="its settings are api_key, api_url"):
        settings.replace(zzz=1)  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match="LAGO_MAX_RETRIES") as info:  # (a value refused by replace: bare too)
        BillingSettings(api_key=KEY, webhook_hmac_key=HMAC_KEY).replace(max_retries=-1)
    assert _leaks(info.value) == []
    # the right keywords still work, and positional arguments are still Python's TypeError
    assert settings.replace(api_timeout=3).api_timeout == 3
    assert QuotaConfig.from_env({}, cold_timeout=3).cold_timeout == 3
    with pytest.raises(TypeError):
        BillingSettings(KEY)  # type: ignore[misc]


@pytest.mark.parametrize(("fields", "cls"), [(SettingsFields, BillingSettings), (QuotaConfigFields, QuotaConfig)])
def test_the_keyword_types_are_the_fields(fields: type, cls: type) -> None:
    """The typed keywords stay in step with the dataclass: same names, same types (run-time hints, so the check
    holds on every supported Python)."""
    hints = typing.get_type_hints(cls)
    assert typing.get_type_hints(fields) == {field.name: hints[field.name] for field in dataclasses.fields(cls)}


USER_CODE = """
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lago_org_billing import BillingSettings, QuotaConfig, attribute_usage

settings = BillingSettings.from_env(require_api_key=False, api_timeout=5.0, quota_mode="monitor")
settings = settings.replace(api_timeout=3, on_unresolved="reject", plan_limits={"starter": {"max_api_calls": 3}})
config = QuotaConfig.from_env(cold_timeout=1.5, no_subscription="allow")


def chat(request: Request, scope: dict[str, Any], response: Response) -> None:
    attribute_usage(request, model="gpt-4o-mini", input_tokens=812, output_tokens=95)
    attribute_usage(request.scope, total_tokens=5)
    attribute_usage(scope, total_tokens=5)
    attribute_usage(response, total_tokens=5)  # error
    attribute_usage(None, total_tokens=5)  # error


settings.replace(api_timout=3)  # error
BillingSettings.from_env(api_timout=3)  # error
QuotaConfig.from_env(cold_timout=3)  # error
settings.replace(api_timeout="3")  # error
settings.replace(quota_mode="enforced")  # error
BillingSettings(on_unresolved="rejct")  # error
"""


@pytest.mark.slow
def test_a_type_checker_sees_misspelt_keywords_and_wrong_values(tmp_path: Path) -> None:
    """``mypy --strict`` on a user's code: each line marked ``# error`` is one (``**changes: Any`` let the misspelt
    keywords and wrong values through; ``attribute_usage(request_or_scope: Any)`` took a response or ``None``, whose
    usage is not billed), the others pass."""
    if shutil.which("mypy") is None and not (Path(sys.executable).parent / "mypy").exists():
        pytest.skip("mypy is not installed")
    source = tmp_path / "user_settings.py"
    source.write_text(textwrap.dedent(USER_CODE))
    # the package under test, where it is imported from (a source tree on the path; mypy refuses site-packages there)
    tree = Path(lago_org_billing.__file__).parents[1]
    env = {**os.environ, "MYPYPATH": str(tree)} if tree.name != "site-packages" else None
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    lines = {int(line.split(":")[1]) for line in result.stdout.splitlines() if ": error:" in line}
    expected = {number for number, line in enumerate(USER_CODE.splitlines(), 1) if line.endswith("# error")}
    assert lines == expected, result.stdout + result.stderr


def test_attribute_usage_given_no_request_says_its_usage_is_not_billed(caplog: pytest.LogCaptureFixture) -> None:
    """``attribute_usage(request.state, ...)`` (or any object that is no request nor scope; Starlette's ``State`` passes
    a type checker, its attributes being ``Any``) was ignored at DEBUG, as a call outside the middleware is: the tokens
    named were silently not billed. It is said once at WARNING, and still never raises; a request outside the
    middleware stays quiet."""
    reset_warnings()
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": []})
    with caplog.at_level(logging.DEBUG, logger="lago_org_billing.attribution"):
        attribute_usage(request, total_tokens=5)  # (outside the middleware: a no-op, at DEBUG)
        assert [r.levelno for r in caplog.records] == [logging.DEBUG]
        caplog.clear()
        attribute_usage(request.state, total_tokens=5)
        attribute_usage(request.state, total_tokens=5)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "given a State, which is neither a request nor an ASGI scope" in record.getMessage()
