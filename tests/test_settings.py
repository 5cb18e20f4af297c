from __future__ import annotations

from pathlib import Path

import pytest

from lago_org_billing import BillingSettings, ConfigurationError


def test_defaults_from_contract() -> None:
    """Defaults match the documented contract."""
    settings = BillingSettings.from_env(None, environ={"LAGO_API_KEY": "k"})
    assert settings.api_url == "http://localhost:3000"
    assert settings.api_timeout == 10.0
    assert settings.event_code == "api_call"
    assert settings.subscription_id_template == "{org_id}"
    assert settings.quota_mode == "enforce"
    assert settings.fail_open is True
    assert settings.usage_cache_ttl == 30.0
    assert settings.plan_limits == {}
    assert settings.exclude_paths == ()
    assert settings.org_header is None
    assert settings.metrics is False


def test_every_variable_is_read() -> None:
    """Each contract variable reaches its field."""
    settings = BillingSettings.from_env(
        None,
        environ={
            "LAGO_API_KEY": "k",
            "LAGO_API_URL": "https://api.getlago.com/api/v1/",
            "LAGO_API_TIMEOUT": "2.5",
            "LAGO_EVENT_CODE": "calls",
            "LAGO_SUBSCRIPTION_ID_TEMPLATE": "{org_id}_main",
            "LAGO_ORG_HEADER": "X-Org-Id",
            "LAGO_USER_HEADER": "X-User-Id",
            "LAGO_EXCLUDE_PATHS": "/health, /metrics",
            "LAGO_SPOOL_PATH": "/tmp/spool.sqlite3",
            "LAGO_REDIS_URL": "redis://127.0.0.1:6379/0",
            "LAGO_QUOTA_MODE": "Monitor",
            "LAGO_FAIL_OPEN": "false",
            "LAGO_USAGE_CACHE_TTL": "5",
            "LAGO_PLAN_LIMITS": '{"starter": {"max_api_calls": 300}}',
            "LAGO_WEBHOOK_HMAC_KEY": "secret-hmac",
            "LAGO_METRICS": "true",
            "LAGO_BILL_SERVER_ERRORS": "yes",
            "LAGO_ON_UNRESOLVED": "Reject",
            "LAGO_UNRESOLVED_STATUS": "403",
        },
    )
    assert settings.api_url == "https://api.getlago.com"
    assert settings.api_timeout == 2.5
    assert settings.event_code == "calls"
    assert settings.subscription_id_for("org_1") == "org_1_main"
    assert settings.org_header == "X-Org-Id"
    assert settings.user_header == "X-User-Id"
    assert settings.exclude_paths == ("/health", "/metrics")
    assert settings.spool_path == "/tmp/spool.sqlite3"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.quota_mode == "monitor"
    assert settings.fail_open is False
    assert settings.usage_cache_ttl == 5.0
    assert settings.plan_limits == {"starter": {"max_api_calls": 300}}
    assert settings.webhook_hmac_key == "secret-hmac"
    assert settings.metrics is True
    assert settings.bill_server_errors is True
    assert settings.on_unresolved == "reject" and settings.unresolved_status == 403


def test_env_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    """A .env file is read; the process environment overrides it."""
    env_file = tmp_path / ".env"
    env_file.write_text("LAGO_API_KEY=from-file\nLAGO_EVENT_CODE=file_code\n")
    settings = BillingSettings.from_env(env_file, environ={"LAGO_EVENT_CODE": "env_code"})
    assert settings.api_key == "from-file"
    assert settings.event_code == "env_code"


def test_missing_env_file_is_not_an_error() -> None:
    """An absent .env is skipped silently."""
    settings = BillingSettings.from_env("/nonexistent/.env", environ={"LAGO_API_KEY": "k"})
    assert settings.api_key == "k"


def test_missing_api_key_names_the_variable() -> None:
    """No API key: a ConfigurationError naming LAGO_API_KEY."""
    with pytest.raises(ConfigurationError, match="LAGO_API_KEY") as info:
        BillingSettings.from_env(None, environ={})
    assert info.value.variable == "LAGO_API_KEY"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LAGO_API_URL", "not a url"),
        ("LAGO_API_URL", "ftp://lago.example"),
        ("LAGO_API_URL", "http://127.0.0.1:notaport"),
        ("LAGO_API_URL", "http://127.0.0.1:99999"),
        ("LAGO_REDIS_URL", "localhost:6379"),
        ("LAGO_API_TIMEOUT", "ten"),
        ("LAGO_API_TIMEOUT", "-1"),
        ("LAGO_API_TIMEOUT", "nan"),
        ("LAGO_MAX_RETRIES", "many"),
        ("LAGO_EVENT_CODE", "  "),
        ("LAGO_SUBSCRIPTION_ID_TEMPLATE", "{org}"),
        ("LAGO_SUBSCRIPTION_ID_TEMPLATE", "static"),
        ("LAGO_SUBSCRIPTION_ID_TEMPLATE", "{org_id"),
        ("LAGO_SUBSCRIPTION_ID_TEMPLATE", "sub_{org_id:d}"),  # a ValueError on every use
        ("LAGO_SUBSCRIPTION_ID_TEMPLATE", "sub_{org_id!r}"),  # ids like sub_'acme'
        ("LAGO_EXCLUDE_PATHS", "health"),
        ("LAGO_ORG_HEADER", "X-Org-Id:"),
        ("LAGO_USER_HEADER", "X User Id"),
        ("LAGO_EXCLUDE_PATHS", "/health, /"),
        ("LAGO_EXCLUDE_PATHS", "/health*"),
        ("LAGO_QUOTA_MODE", "strict"),
        ("LAGO_FAIL_OPEN", "maybe"),
        ("LAGO_METRICS", "sometimes"),
        ("LAGO_BILL_SERVER_ERRORS", "perhaps"),
        ("LAGO_ON_UNRESOLVED", "deny"),
        ("LAGO_UNRESOLVED_STATUS", "402"),
        ("LAGO_UNRESOLVED_STATUS", "four"),
        ("LAGO_USAGE_CACHE_TTL", "0"),
        ("LAGO_PLAN_LIMITS", "{not json"),
        ("LAGO_PLAN_LIMITS", '["starter"]'),
        ("LAGO_PLAN_LIMITS", '{"starter": {"max_api_calls": -1}}'),
        ("LAGO_PLAN_LIMITS", '{"starter": 5}'),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str) -> None:
    """Every malformed value is a ConfigurationError naming its variable."""
    with pytest.raises(ConfigurationError, match=variable) as info:
        BillingSettings.from_env(None, environ={"LAGO_API_KEY": "k", variable: value})
    assert info.value.variable == variable


def test_api_key_never_in_repr_or_errors() -> None:
    """The API key and HMAC key are hidden from repr, and errors do not quote them."""
    secret = "sk_live_very_secret_value"
    settings = BillingSettings(api_key=secret, webhook_hmac_key=secret)
    assert secret not in repr(settings)
    assert secret not in str(settings)
    with pytest.raises(ConfigurationError) as info:
        BillingSettings.from_env(None, environ={"LAGO_API_KEY": secret, "LAGO_API_TIMEOUT": "x"})
    assert secret not in str(info.value)


def test_url_passwords_never_in_repr_or_errors() -> None:
    """LAGO_REDIS_URL usually carries Redis' password (redis://:pw@host, or ?password=): masked in repr and in the
    error of a mistyped scheme (which a lifespan hands to the server's log); the rest of the URL is shown."""
    secret = "s3cretRedisPw"
    shown = repr(BillingSettings(redis_url=f"redis://:{secret}@redis.internal:6379/0"))
    assert secret not in shown and "redis://:***@redis.internal:6379/0" in shown
    assert secret not in repr(BillingSettings(redis_url=f"redis://user:{secret}@h/0?password={secret}&db=1"))
    assert secret not in repr(BillingSettings(redis_url=f"redis://{secret}@h/0"))  # a lone password
    assert "'unix:///run/redis.sock'" in repr(BillingSettings(redis_url="unix:///run/redis.sock"))  # unchanged
    assert "api_url='http://localhost:3000'," in shown  # quoted once
    with pytest.raises(ConfigurationError) as info:
        BillingSettings(redis_url=f"http://:{secret}@redis.internal:6379/0")
    assert secret not in str(info.value) and "redis.internal" in str(info.value)


def test_settings_are_frozen_and_keyword_only() -> None:
    """Settings cannot be mutated; replace() validates again."""
    settings = BillingSettings(api_key="k")
    with pytest.raises(AttributeError):
        settings.api_key = "other"  # type: ignore[misc]
    with pytest.raises(ConfigurationError, match="LAGO_API_TIMEOUT"):
        settings.replace(api_timeout=0)
    with pytest.raises(TypeError):
        BillingSettings("k")  # type: ignore[misc]
