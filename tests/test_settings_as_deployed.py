"""The contract's environment variables with odd but plausible values, the CLI's help and `health`, and the examples,
as a user meets them.

Each odd value is either read with its obvious meaning or refused at once with a ConfigurationError that names the
variable and says what to do, never kept as a silently wrong value: quotes a `docker --env-file` keeps, a key pasted
with its `Bearer `, `~` in a spool path, `true` for a header name, blank-separated exclusions, `1e+06` limits (Helm's
`toJson`), a `LAGO_API_TIMEOUT` longer than the default retry deadline that capped it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from lago_org_billing import BillingSettings, ConfigurationError, LagoClient
from lago_org_billing.cli import main
from test_examples import EXAMPLES, load

SECRET = "5b1e6c1a-0d6f-4e0e-9a57-3f0c9c3d2b11"


def settings_from(**environ: str) -> BillingSettings:
    return BillingSettings.from_env(None, environ={"LAGO_API_KEY": "k", **environ})


def refused(variable: str, value: str) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as info:
        settings_from(**{variable: value})
    assert info.value.variable == variable and variable in str(info.value)
    return info.value


# ----------------------------------------------------------------------------------------------- quoted values


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LAGO_API_KEY", f'"{SECRET}"'),
        ("LAGO_EVENT_CODE", '"api_call"'),
        ("LAGO_SUBSCRIPTION_ID_TEMPLATE", "'{org_id}'"),
        ("LAGO_USER_HEADER", "'X-User-Id'"),
        ("LAGO_SPOOL_PATH", '"/var/lib/app/spool.db"'),
        ("LAGO_WEBHOOK_HMAC_KEY", f"'{SECRET}'"),
        ("LAGO_ORGANIZATION_ID", f'"{SECRET}"'),
        ("LAGO_API_URL", '"https://api.getlago.com"'),
        ("LAGO_FAIL_OPEN", '"false"'),
        ("LAGO_PLAN_LIMITS", '\'{"starter": {"max_api_calls": 300}}\''),
    ],
)
def test_a_value_wrapped_in_quotes_is_refused_saying_to_remove_them(variable: str, value: str) -> None:
    """`docker run --env-file` and compose's `environment:` lists keep quotes as part of the value. They were kept:
    an API key Lago refuses, events of code `"api_call"` no metric counts, every org's subscription looked up as
    `'org_1'` (each request a 402), a spool file named `"/var/...` in the working directory."""
    error = refused(variable, value)
    assert "quote" in str(error)
    assert SECRET not in str(error)


def test_quotes_inside_a_value_are_its_own() -> None:
    """Only a value wrapped whole in a pair of the same quote is refused."""
    assert settings_from(LAGO_EVENT_CODE="it's").event_code == "it's"
    assert BillingSettings.from_env(None, environ={"LAGO_API_KEY": "'"}).api_key == "'"


# ----------------------------------------------------------------------------------------------- LAGO_API_KEY


@pytest.mark.parametrize("value", [f"Bearer {SECRET}", f"bearer {SECRET}", f"Authorization: Bearer {SECRET}"])
def test_an_api_key_pasted_with_its_bearer_prefix_is_refused(value: str) -> None:
    """Copied from a curl line of Lago's docs, the key was sent as `Bearer Bearer <key>`: every call a 401 (events
    kept and retried for ever). Refused at once, without echoing the key."""
    with pytest.raises(ConfigurationError, match="Bearer") as info:
        BillingSettings.from_env(None, environ={"LAGO_API_KEY": value})
    assert info.value.variable == "LAGO_API_KEY" and SECRET not in str(info.value)
    with pytest.raises(ConfigurationError, match="LAGO_API_KEY"):
        BillingSettings(api_key=value)


def test_an_api_key_with_a_blank_inside_is_refused() -> None:
    """Two values pasted together, or a line break: no Lago key has a blank."""
    with pytest.raises(ConfigurationError, match="LAGO_API_KEY") as info:
        BillingSettings.from_env(None, environ={"LAGO_API_KEY": f"{SECRET} {SECRET}"})
    assert SECRET not in str(info.value)


# ---------------------------------------------------------------------------------------------- LAGO_API_URL


@pytest.mark.parametrize(
    "value",
    ["http://lago:3000//api/v1", "http://lago:3000/api/v1//", "http://lago:3000//", "http://lago:3000/api/v1 "],
)
def test_api_url_slashes_around_api_v1_are_dropped(value: str) -> None:
    """`${LAGO_HOST}/` + `/api/v1` left `http://lago:3000/`: calls went to `//api/v1/...`."""
    assert settings_from(LAGO_API_URL=value).api_url == "http://lago:3000"


# ----------------------------------------------------------------------------------------- LAGO_API_TIMEOUT


def test_api_timeout_longer_than_the_default_deadline_is_honoured() -> None:
    """LAGO_API_TIMEOUT=60 for a slow Lago was cut to 30 s per call by the default LAGO_RETRY_DEADLINE: the
    deadline left at its default now gives the call its timeout; one set explicitly is kept."""
    assert settings_from(LAGO_API_TIMEOUT="60").retry_deadline >= 60
    assert BillingSettings(api_timeout=60).retry_deadline >= 60
    assert BillingSettings(api_timeout=60).replace(api_timeout=5).retry_deadline == 30
    assert settings_from(LAGO_API_TIMEOUT="5").retry_deadline == 30
    assert settings_from(LAGO_API_TIMEOUT="60", LAGO_RETRY_DEADLINE="20").retry_deadline == 20
    assert BillingSettings(api_timeout=60, retry_deadline=20).retry_deadline == 20


@pytest.mark.anyio
async def test_api_timeout_is_the_time_a_call_is_given() -> None:
    """What the client gives one attempt: LAGO_API_TIMEOUT, not 30 s."""
    timeouts: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"]["read"])
        return httpx.Response(200, json={"customer": {"external_id": "org_1"}})

    settings = settings_from(LAGO_API_TIMEOUT="60")
    async with LagoClient(settings, transport=httpx.MockTransport(answer)) as lago:
        await lago.get_customer("org_1")
    assert timeouts and timeouts[0] > 59


# ------------------------------------------------------------------------------------------ LAGO_SPOOL_PATH


def test_spool_path_with_a_tilde_is_in_the_home_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`.env`, docker and systemd do not expand `~`: `LAGO_SPOOL_PATH=~/billing/spool.db` made a directory named
    `~` in the working directory (which `rm -rf ~` then "cleans")."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert settings_from(LAGO_SPOOL_PATH="~/billing/spool.db").spool_path == str(tmp_path / "billing" / "spool.db")
    assert BillingSettings(spool_path="~/spool.db").spool_path == str(tmp_path / "spool.db")


def test_spool_path_memory_says_to_unset_it() -> None:
    """SQLite's `:memory:` made a file named `:memory:` in the working directory."""
    assert "unset" in str(refused("LAGO_SPOOL_PATH", ":memory:"))


# ------------------------------------------------------------------------------------ LAGO_ORG/USER_HEADER


@pytest.mark.parametrize("variable", ["LAGO_ORG_HEADER", "LAGO_USER_HEADER"])
@pytest.mark.parametrize("value", ["true", "1", "yes", "ON"])
def test_a_header_variable_set_like_a_switch_is_refused(variable: str, value: str) -> None:
    """`LAGO_ORG_HEADER=true` ("opt-in") named a header `true` no client sends: every request unresolved, served
    unbilled, silently."""
    assert "X-Org-Id" in str(refused(variable, value))


def test_a_header_given_by_its_wsgi_name_is_refused() -> None:
    """Django's `HTTP_X_ORG_ID` is not what clients send (and proxies drop names with `_`)."""
    assert "X-Org-Id" in str(refused("LAGO_ORG_HEADER", "HTTP_X_ORG_ID"))


# --------------------------------------------------------------------------------------- LAGO_EXCLUDE_PATHS


@pytest.mark.parametrize("value", ["/health /metrics", "/health;/metrics", "/health; /metrics", "/health\t/docs"])
def test_exclude_paths_separated_otherwise_than_by_commas_are_refused(value: str) -> None:
    """`/health /metrics` was one prefix no request has: both were billed and gated."""
    assert "comma" in str(refused("LAGO_EXCLUDE_PATHS", value))


def test_exclude_paths_with_commas_and_blanks_around_are_read() -> None:
    assert settings_from(LAGO_EXCLUDE_PATHS=" /health , /metrics/ ,").exclude_paths == ("/health", "/metrics/")


# ----------------------------------------------------------------------------------------- LAGO_PLAN_LIMITS


def test_plan_limits_written_as_whole_floats_are_read_as_numbers() -> None:
    """Helm's `toJson` writes 1000000 as `1e+06`, other tools `300.0`: those are whole numbers."""
    limits = settings_from(LAGO_PLAN_LIMITS='{"starter": {"max_api_calls": 300.0, "max_tokens": 1e+06}}').plan_limits
    assert limits == {"starter": {"max_api_calls": 300, "max_tokens": 1000000}}
    assert all(type(value) is int for value in limits["starter"].values())


@pytest.mark.parametrize("value", ["300.5", '"300"', "-1.0", "1e400"])
def test_plan_limits_that_are_no_whole_number_are_refused(value: str) -> None:
    refused("LAGO_PLAN_LIMITS", f'{{"starter": {{"max_api_calls": {value}}}}}')


# --------------------------------------------------------------------------------------------------- the CLI


def help_of(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_health_help_names_its_variables_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """`health --help` said only `--json`: not what it reads nor what its exit codes mean."""
    text = " ".join(help_of("health", capsys=capsys).split())
    for name in ("LAGO_API_URL", "LAGO_API_KEY", "LAGO_API_TIMEOUT", ".env"):
        assert name in text
    assert "0" in text and "1" in text and "2" in text and "exit" in text.lower()


def test_top_level_help_lists_the_contracts_variables(capsys: pytest.CaptureFixture[str]) -> None:
    """`lago-org-billing --help` named two variables; the contract has fifteen."""
    text = help_of(capsys=capsys)
    for name in (
        "LAGO_API_URL",
        "LAGO_API_KEY",
        "LAGO_API_TIMEOUT",
        "LAGO_EVENT_CODE",
        "LAGO_SUBSCRIPTION_ID_TEMPLATE",
        "LAGO_ORG_HEADER",
        "LAGO_USER_HEADER",
        "LAGO_EXCLUDE_PATHS",
        "LAGO_SPOOL_PATH",
        "LAGO_REDIS_URL",
        "LAGO_QUOTA_MODE",
        "LAGO_FAIL_OPEN",
        "LAGO_USAGE_CACHE_TTL",
        "LAGO_PLAN_LIMITS",
        "LAGO_WEBHOOK_HMAC_KEY",
    ):
        assert name in text


def test_demo_help_says_it_ignores_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    assert "LAGO_" in help_of("demo", capsys=capsys)


def test_health_of_the_emulator_as_the_user_writes_its_url(
    fake_lago_server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`LAGO_API_URL` copied with `/api/v1/` from Lago's docs: healthy, exit 0; a wrong key: exit 1, saying so."""
    monkeypatch.setenv("LAGO_API_URL", f"{fake_lago_server.url}/api/v1/")
    monkeypatch.setenv("LAGO_API_KEY", fake_lago_server.api_key)
    assert main(["health", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["url"] == fake_lago_server.url
    monkeypatch.setenv("LAGO_API_KEY", "not-the-key")
    assert main(["health"]) == 1
    assert "refuses this API key" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the examples


def test_fastapi_example_keeps_the_environments_exclusions(
    fake_lago_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example replaced LAGO_EXCLUDE_PATHS with its own list: a user's `/v1/models` (or `/health`) exclusion
    was billed."""
    fake_lago_server.seed(json.loads((EXAMPLES / "seed.json").read_text()))
    monkeypatch.setenv("LAGO_API_URL", fake_lago_server.url)
    monkeypatch.setenv("LAGO_API_KEY", fake_lago_server.api_key)
    monkeypatch.setenv("LAGO_EXCLUDE_PATHS", "/v1/chat")
    module = load("fastapi_app")
    assert "/v1/chat" in module.settings.exclude_paths and "/webhooks/" in module.settings.exclude_paths
    with TestClient(module.app) as client:
        assert client.post("/v1/chat", headers={"Authorization": "Bearer org_acme:ada"}).status_code == 200
    assert fake_lago_server.events == []
