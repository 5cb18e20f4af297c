"""Review of settings as users write them: ``.env`` files and secret files, compared with python-dotenv and compose.

Covered: ``${VAR}`` and ``${VAR:-default}`` references in a ``.env`` (expanded as python-dotenv's ``load_dotenv``
expands them, instead of a literal ``${SECRET}`` taken for the API key: every call a 401), a reference to a variable
set nowhere, references that reached the settings unexpanded (``docker run --env-file``, systemd's
``EnvironmentFile``), a quote opened and never closed or text after a closing quote (python-dotenv skips such a line;
it was read here with its stray quote as the key), a line python-dotenv cannot read (``LAGO_QUOTA_MODE: monitor``,
silently ignored: the gate enforced), a ``.env`` that cannot be read, Docker/Kubernetes secret files
(``LAGO_API_KEY_FILE``, ``LAGO_WEBHOOK_HMAC_KEY_FILE``), an empty ``LAGO_API_URL`` and one without its scheme.
"""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from lago_org_billing import BillingSettings, ConfigurationError, LagoWebhooks, _settings
from lago_org_billing._webhooks import sign_hmac

SECRET = "5b1e6c1a-0d6f-4e0e-9a57-3f0c9c3d2b11"


def from_file(tmp_path: Path, text: str, **environ: str) -> BillingSettings:
    env = tmp_path / ".env"
    env.write_bytes(text.encode())
    return BillingSettings.from_env(env, environ=environ, require_api_key=False)


def refused_from_file(tmp_path: Path, text: str, variable: str, **environ: str) -> str:
    with pytest.raises(ConfigurationError) as info:
        from_file(tmp_path, text, **environ)
    message = str(info.value)
    assert info.value.variable == variable and variable in message, message
    return message


# ------------------------------------------------------------------------------------------- ${VAR} references


@pytest.mark.parametrize(
    ("text", "environ", "field", "expected"),
    [
        ("LAGO_API_KEY=${LAGO_KEY}\n", {"LAGO_KEY": SECRET}, "api_key", SECRET),
        ('LAGO_API_KEY="${LAGO_KEY}"\n', {"LAGO_KEY": SECRET}, "api_key", SECRET),
        ("LAGO_HOST=lago\nLAGO_API_URL=http://${LAGO_HOST}:3000/\n", {}, "api_url", "http://lago:3000"),
        ("LAGO_API_URL=${LAGO_URL:-http://lago:3000}\n", {}, "api_url", "http://lago:3000"),
        (
            "LAGO_API_URL=${LAGO_URL:-http://lago:3000}\n",
            {"LAGO_URL": "https://api.getlago.com"},
            "api_url",
            "https://api.getlago.com",
        ),
        ("LAGO_REDIS_URL=${REDIS_URL:-}\n", {}, "redis_url", None),
        ("LAGO_QUOTA_MODE=${MODE}\nMODE=off\n", {"MODE": "monitor"}, "quota_mode", "monitor"),
    ],
    ids=["plain", "double-quoted", "earlier-line", "default", "default-overridden", "empty-default", "environment"],
)
def test_a_reference_in_a_dotenv_is_expanded_as_python_dotenv_expands_it(
    tmp_path: Path, text: str, environ: dict[str, str], field: str, expected: Any
) -> None:
    """python-dotenv's ``load_dotenv`` (and compose's ``.env``) expand ``${VAR}``: the literal ``${LAGO_KEY}`` was
    taken for the API key (every call to Lago a 401) and ``${LAGO_URL:-...}`` refused as no URL."""
    assert getattr(from_file(tmp_path, text, **environ), field) == expected


def test_a_reference_to_a_variable_set_nowhere_is_refused_naming_it(tmp_path: Path) -> None:
    message = refused_from_file(tmp_path, "LAGO_API_KEY=${LAGO_KEY}\n", "LAGO_API_KEY")
    assert "LAGO_KEY" in message and "${LAGO_KEY:-" in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LAGO_API_KEY", "${LAGO_KEY}"),
        ("LAGO_API_KEY", "$LAGO_KEY"),
        ("LAGO_WEBHOOK_HMAC_KEY", "${HMAC_KEY}"),
        ("LAGO_ORGANIZATION_ID", "${LAGO_ORG}"),
        ("LAGO_SPOOL_PATH", "${HOME}/billing/spool.db"),
        ("LAGO_SPOOL_PATH", "$STATE_DIRECTORY/spool.db"),
    ],
)
def test_an_unexpanded_reference_from_the_environment_is_refused(variable: str, value: str) -> None:
    """``docker run --env-file`` and systemd's ``EnvironmentFile`` pass ``${...}`` as it is written: it was the API
    key (every call a 401), the HMAC key (every webhook a 401), or a directory named ``${HOME}`` made for the spool."""
    with pytest.raises(ConfigurationError, match="expand") as info:
        BillingSettings.from_env(None, environ={"LAGO_API_KEY": SECRET, variable: value})
    assert info.value.variable == variable and variable in str(info.value)
    with pytest.raises(ConfigurationError, match="expand"):
        BillingSettings(**{"api_key": SECRET, _field(variable): value})


def _field(variable: str) -> str:
    return {
        "LAGO_API_KEY": "api_key",
        "LAGO_WEBHOOK_HMAC_KEY": "webhook_hmac_key",
        "LAGO_ORGANIZATION_ID": "organization_id",
        "LAGO_SPOOL_PATH": "spool_path",
    }[variable]


def test_dollars_inside_real_values_are_kept(tmp_path: Path) -> None:
    """What the reference checks must not catch: a ``$`` inside an HMAC key, a Redis password, a quoted value."""
    settings = from_file(
        tmp_path,
        "LAGO_WEBHOOK_HMAC_KEY='a$b{c}'\nLAGO_REDIS_URL=redis://:pa$$word@redis:6379/0\n",
    )
    assert settings.webhook_hmac_key == "a$b{c}"
    assert settings.redis_url == "redis://:pa$$word@redis:6379/0"


# ----------------------------------------------------------------------------------------- quotes and lines


@pytest.mark.parametrize(
    "text",
    [
        f'LAGO_API_KEY="{SECRET}\nLAGO_QUOTA_MODE=monitor\n',
        f"LAGO_API_KEY='{SECRET}\n",
        f'LAGO_API_KEY="{SECRET}"x\n',
        f'LAGO_API_KEY="{SECRET}\nLAGO_EVENT_CODE="api_call"\n',
    ],
    ids=["unclosed-double", "unclosed-single", "text-after-quote", "closed-lines-later"],
)
def test_a_quote_not_closed_is_refused_not_taken_into_the_key(tmp_path: Path, text: str) -> None:
    """python-dotenv skips such a line; it was read here with its stray quote, ``"5b1e...`` taken for the API key
    (every call a 401). The error names the variable and the line, never the secret."""
    message = refused_from_file(tmp_path, text, "LAGO_API_KEY")
    assert "line 1" in message and "quote" in message and SECRET not in message


def test_lines_after_an_unclosed_quote_are_read(tmp_path: Path) -> None:
    settings = from_file(tmp_path, 'LAGO_ORGANIZATION_ID="org\nLAGO_QUOTA_MODE=monitor\n', LAGO_ORGANIZATION_ID="o")
    assert settings.quota_mode == "monitor"


@pytest.mark.parametrize("line", ["LAGO_QUOTA_MODE: monitor", "LAGO_QUOTA_MODE monitor", "export LAGO_QUOTA_MODE:=off"])
def test_a_line_dotenv_cannot_read_is_refused_not_ignored(tmp_path: Path, line: str) -> None:
    """``LAGO_QUOTA_MODE: monitor`` (YAML habits) was skipped silently: the gate enforced where monitor was written."""
    message = refused_from_file(tmp_path, f"# billing\n{line}\n", "LAGO_QUOTA_MODE")
    assert "line 2" in message and "LAGO_QUOTA_MODE=" in message


def test_a_bare_name_still_means_from_the_environment(tmp_path: Path) -> None:
    """As compose's ``env_file`` reads it: ``LAGO_QUOTA_MODE`` alone is taken from the environment, never refused."""
    assert from_file(tmp_path, "LAGO_QUOTA_MODE\nexport LAGO_METRICS\n", LAGO_QUOTA_MODE="off").quota_mode == "off"


# ------------------------------------------------------------------------------------------- the .env itself


def test_a_dotenv_that_cannot_be_read_is_a_configuration_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``.env`` owned by root with mode 600 (copied into an image run as another user) was a bare
    ``PermissionError`` naming no setting."""
    env = tmp_path / ".env"
    env.write_text(f"LAGO_API_KEY={SECRET}\n")

    def denied(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(env):
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(_settings, "open", denied, raising=False)
    with pytest.raises(ConfigurationError, match="Permission denied") as info:
        BillingSettings.from_env(env, environ={})
    assert str(env) in str(info.value) and "readable" in str(info.value)


def test_a_dotenv_directory_is_skipped(tmp_path: Path) -> None:
    """``python -m venv .env`` makes a directory of that name: it is no settings file."""
    (tmp_path / ".env").mkdir()
    assert BillingSettings.from_env(tmp_path / ".env", environ={"LAGO_API_KEY": SECRET}).api_key == SECRET


# ---------------------------------------------------------------------------------------------- secret files


def test_the_api_key_is_read_from_a_secret_file(tmp_path: Path) -> None:
    """Docker and Kubernetes secrets are files (``/run/secrets/lago_api_key``): ``LAGO_API_KEY_FILE`` was ignored
    and the app refused to start saying LAGO_API_KEY is not set."""
    secret = tmp_path / "lago_api_key"
    secret.write_text(SECRET + "\n")
    settings = BillingSettings.from_env(None, environ={"LAGO_API_KEY_FILE": str(secret)})
    assert settings.api_key == SECRET


@pytest.mark.anyio
async def test_a_webhook_receiver_reads_its_hmac_key_from_a_secret_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "hmac-" + SECRET
    (tmp_path / "hmac").write_text(key + "\n")
    (tmp_path / ".env").write_text(f"LAGO_WEBHOOK_HMAC_KEY_FILE={tmp_path / 'hmac'}\n")
    monkeypatch.chdir(tmp_path)
    seen: list[str] = []

    async def handler(event: Any) -> None:
        seen.append(event.webhook_type)

    app = Starlette(routes=[Route("/webhooks/lago", LagoWebhooks(handlers={"*": handler}), methods=["POST"])])
    body = b'{"webhook_type":"invoice.created","object_type":"invoice","invoice":{"lago_id":"inv-1"}}'
    headers = {
        "content-type": "application/json",
        "x-lago-signature": sign_hmac(body, key),
        "x-lago-signature-algorithm": "hmac",
        "x-lago-unique-key": "u-1",
    }
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
        answer = await http.post("/webhooks/lago", content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert seen == ["invoice.created"]


def test_a_secret_file_and_the_variable_both_set_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text(SECRET)
    with pytest.raises(ConfigurationError, match="LAGO_API_KEY_FILE") as info:
        BillingSettings.from_env(None, environ={"LAGO_API_KEY": SECRET, "LAGO_API_KEY_FILE": str(secret)})
    assert info.value.variable == "LAGO_API_KEY" and SECRET not in str(info.value)


def test_a_secret_file_in_the_environment_wins_over_the_dotenv_value(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text(SECRET)
    settings = from_file(tmp_path, "LAGO_API_KEY=dev-key\n", LAGO_API_KEY_FILE=str(secret))
    assert settings.api_key == SECRET


@pytest.mark.parametrize("problem", ["missing", "directory", "empty"])
def test_a_secret_file_that_cannot_be_read_names_its_variable_and_path(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "lago_api_key"
    if problem == "directory":
        path.mkdir()
    elif problem == "empty":
        path.write_text("\n")
    with pytest.raises(ConfigurationError) as info:
        BillingSettings.from_env(None, environ={"LAGO_API_KEY_FILE": str(path)})
    assert info.value.variable == "LAGO_API_KEY_FILE" and str(path) in str(info.value)
    if problem == "empty":
        assert "empty" in str(info.value)


# ------------------------------------------------------------------------------------------------ API URL


@pytest.mark.parametrize("text", ["LAGO_API_URL=\n", 'LAGO_API_URL=""\n'])
def test_an_empty_api_url_says_to_unset_it_for_the_default(tmp_path: Path, text: str) -> None:
    message = refused_from_file(tmp_path, text, "LAGO_API_URL")
    assert "empty" in message and "http://localhost:3000" in message


@pytest.mark.parametrize(
    ("value", "suggested"),
    [
        ("lago:3000", "http://lago:3000"),
        ("api.getlago.com", "https://api.getlago.com"),
        ("localhost", "http://localhost"),
    ],
)
def test_an_api_url_without_its_scheme_says_which_to_write(value: str, suggested: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        BillingSettings.from_env(None, environ={"LAGO_API_KEY": SECRET, "LAGO_API_URL": value})
    assert info.value.variable == "LAGO_API_URL" and suggested in str(info.value) and "scheme" in str(info.value)


# ----------------------------------------------------------------------------------- subscription id template


def test_a_template_written_as_a_javascript_template_string_is_refused(tmp_path: Path) -> None:
    """``sub_${org_id}`` (a JavaScript or shell habit) made every subscription id ``sub_$acme``: none exists in
    Lago, every request a 402. From a ``.env`` the reference is said to be no variable, with the right spelling."""
    with pytest.raises(ConfigurationError, match=r"without '\$'") as info:
        BillingSettings.from_env(
            None, environ={"LAGO_API_KEY": SECRET, "LAGO_SUBSCRIPTION_ID_TEMPLATE": "sub_${org_id}"}
        )
    assert info.value.variable == "LAGO_SUBSCRIPTION_ID_TEMPLATE"
    message = refused_from_file(
        tmp_path, "LAGO_SUBSCRIPTION_ID_TEMPLATE=sub_${org_id}\n", "LAGO_SUBSCRIPTION_ID_TEMPLATE"
    )
    assert "{org_id}, without '$'" in message
