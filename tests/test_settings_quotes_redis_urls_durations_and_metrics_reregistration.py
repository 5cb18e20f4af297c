"""Review of configuration and observability as deployed for real.

Settings: values wrapped in quotes that reach ``BillingSettings`` from code (``os.environ[...]`` of a docker
``--env-file``: secrets included, every webhook a 401), ``LAGO_REDIS_URL`` spellings redis-py reads as another
server or database, ``LAGO_PLAN_LIMITS`` errors that point at the position (line and column) and say the expected
shape (duplicate plan codes, Python dicts, huge numbers), durations with units (``10s``, ``500ms``, ``1m30s``), the
other spellings of booleans and whole numbers, and empty values that say how to get the default.

Metrics: a collector unregistered from its registry (a test fixture cleaning ``prometheus_client.REGISTRY``, an app
made anew) is registered again by the next registration instead of exporting nothing.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from lago_org_billing import BillingSettings, ConfigurationError, OrgBillingMiddleware, PipelineMetrics, _metrics

SECRET = "5b1e6c1a-0d6f-4e0e-9a57-3f0c9c3d2b11"


def settings_from(**environ: str) -> BillingSettings:
    return BillingSettings.from_env(None, environ={"LAGO_API_KEY": "k", **environ})


def refused(variable: str, value: str) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as info:
        settings_from(**{variable: value})
    assert info.value.variable == variable and variable in str(info.value)
    return info.value


# ------------------------------------------------------------------------------------- quotes given in code


@pytest.mark.parametrize(
    ("field", "variable", "value"),
    [
        ("webhook_hmac_key", "LAGO_WEBHOOK_HMAC_KEY", f'"{SECRET}"'),
        ("api_key", "LAGO_API_KEY", f"'{SECRET}'"),
        ("organization_id", "LAGO_ORGANIZATION_ID", f'"{SECRET}"'),
        ("org_header", "LAGO_ORG_HEADER", "'X-Org-Id'"),
        ("user_header", "LAGO_USER_HEADER", '"X-User-Id"'),
        ("event_code", "LAGO_EVENT_CODE", '"api_call"'),
        ("subscription_id_template", "LAGO_SUBSCRIPTION_ID_TEMPLATE", "'{org_id}'"),
        ("spool_path", "LAGO_SPOOL_PATH", '"/var/lib/app/spool.db"'),
    ],
)
def test_a_value_wrapped_in_quotes_given_in_code_is_refused(field: str, variable: str, value: str) -> None:
    """``BillingSettings(webhook_hmac_key=os.environ["LAGO_WEBHOOK_HMAC_KEY"])`` under ``docker run --env-file``
    (which keeps the quotes) was accepted: every webhook then failed with 401 (an API key: every call a 401; a header
    name no client sends; a spool file named ``"/var/...``). Lago's keys and ids are UUIDs: quotes are never part of
    them. Refused as ``from_env`` refuses them, without echoing a secret."""
    with pytest.raises(ConfigurationError, match="quotes") as info:
        BillingSettings(**{field: value})
    assert info.value.variable == variable
    assert SECRET not in str(info.value)


def test_quotes_inside_a_value_given_in_code_are_its_own() -> None:
    assert BillingSettings(event_code="it's").event_code == "it's"
    assert BillingSettings(webhook_hmac_key='Zx#9 "q\\w==').webhook_hmac_key == 'Zx#9 "q\\w=='


@pytest.mark.parametrize(
    ("field", "variable"), [("api_key", "LAGO_API_KEY"), ("webhook_hmac_key", "LAGO_WEBHOOK_HMAC_KEY")]
)
def test_a_secret_that_is_not_text_is_refused(field: str, variable: str) -> None:
    """``webhook_hmac_key=b"..."`` (read from a file in binary) was accepted, then failed at the first webhook with an
    AttributeError (an API key: a TypeError at the first call)."""
    with pytest.raises(ConfigurationError) as info:
        BillingSettings(**{field: SECRET.encode()})
    assert info.value.variable == variable and SECRET not in str(info.value)


# -------------------------------------------------------------------------------------------- LAGO_REDIS_URL


@pytest.mark.parametrize(
    "value",
    [
        "redis:6379",  # redis-py: localhost, database 6379
        "redis:redis:6379",
        "redis://redis:6379/abc",  # redis-py: database 0, silently
        "redis://redis:6379/0/1",
        "unix:",  # redis-py: no socket path (localhost TCP)
    ],
)
def test_a_redis_url_read_as_another_server_or_database_is_refused(value: str) -> None:
    """Accepted, and redis-py then talked to another server or database than the one meant (`redis:6379`, a host and
    port without `//`, is Redis on localhost, database 6379)."""
    error = refused("LAGO_REDIS_URL", value)
    assert "redis://" in str(error)


@pytest.mark.parametrize(
    "value",
    [
        "redis://redis:6379",
        "redis://redis:6379/",
        "redis://redis:6379/15",
        "rediss://:secret@redis.example.com:6380/1?ssl_cert_reqs=none",
        "redis://localhost",
        "unix:///var/run/redis.sock?db=2",
    ],
)
def test_redis_urls_as_written_are_kept(value: str) -> None:
    assert settings_from(LAGO_REDIS_URL=value).redis_url == value


def test_a_redis_url_given_in_code_is_stripped() -> None:
    """A Kubernetes secret's line break, kept by code reading the variable itself."""
    assert BillingSettings(redis_url="redis://redis:6379/0\n").redis_url == "redis://redis:6379/0"


# ------------------------------------------------------------------------------------------ LAGO_PLAN_LIMITS


def test_a_json_error_on_several_lines_points_at_its_line_and_column() -> None:
    """`LAGO_PLAN_LIMITS` from a Helm block or `$(cat limits.json)`: "at char 41" had to be counted by hand."""
    value = '{\n  "starter": {\n    "max_api_calls": 300\n    "max_tokens": 100000\n  }\n}'
    message = str(refused("LAGO_PLAN_LIMITS", value))
    assert "line 4, column 5" in message
    assert '"max_tokens": 100000' in message  # the line shown
    assert '{"starter": {"max_api_calls": 300' in message  # the shape expected


def test_a_json_error_on_one_line_shows_where() -> None:
    message = str(refused("LAGO_PLAN_LIMITS", '{"starter": {"max_api_calls": 300,}}'))
    # (Python 3.13's json says "Illegal trailing comma" at the comma; before, "Expecting property name" after it)
    column = 34 if sys.version_info >= (3, 13) else 35
    assert f"column {column}" in message and "300,}}" in message and "^" in message
    assert '{"starter": {"max_api_calls": 300' in message


def test_a_python_dict_is_told_json_needs_double_quotes() -> None:
    message = str(refused("LAGO_PLAN_LIMITS", "{'starter': {'max_api_calls': 300}}"))
    assert "double quotes" in message


def test_a_plan_written_twice_is_refused() -> None:
    """The second `starter` silently replaced the first: its `max_api_calls` limit was gone."""
    message = str(
        refused("LAGO_PLAN_LIMITS", '{"starter": {"max_api_calls": 300}, "pro": {}, "starter": {"max_tokens": 1}}')
    )
    assert "'starter'" in message and "twice" in message
    message = str(refused("LAGO_PLAN_LIMITS", '{"starter": {"max_api_calls": 300, "max_api_calls": 30}}'))
    assert "'max_api_calls'" in message and "twice" in message


def test_a_number_too_long_to_read_is_a_configuration_error() -> None:
    """A raw ValueError (Python's 4300-digit limit) escaped instead of a ConfigurationError."""
    refused("LAGO_PLAN_LIMITS", '{"starter": {"max_api_calls": ' + "9" * 5000 + "}}")


def test_a_flat_object_says_plans_come_first() -> None:
    message = str(refused("LAGO_PLAN_LIMITS", '{"max_api_calls": 300}'))
    assert "plan code" in message


# ----------------------------------------------------------------------------------- durations, switches, ints


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("10", 10.0),
        ("10s", 10.0),
        ("10 s", 10.0),
        ("1.5s", 1.5),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("10sec", 10.0),
        ("10 seconds", 10.0),
        ("10S", 10.0),
    ],
)
def test_durations_are_read_with_their_unit(value: str, seconds: float) -> None:
    """`LAGO_API_TIMEOUT=10s` (Go's and systemd's spelling) was refused."""
    settings = settings_from(
        LAGO_API_TIMEOUT=value, LAGO_USAGE_CACHE_TTL=value, LAGO_RETRY_DEADLINE=value, LAGO_RETRY_BACKOFF=value
    )
    assert settings.api_timeout == settings.usage_cache_ttl == settings.retry_deadline == seconds
    assert settings.retry_backoff == seconds


@pytest.mark.parametrize("value", ["10x", "s", "10 minutes ago", "1m-30s", "ten"])
def test_durations_that_are_not_are_refused_saying_seconds(value: str) -> None:
    assert "seconds" in str(refused("LAGO_API_TIMEOUT", value))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("y", True),
        ("Y", True),
        ("t", True),
        ("enabled", True),
        ("enable", True),
        ("n", False),
        ("f", False),
        ("disabled", False),
        ("DISABLE", False),
    ],
)
def test_switches_in_their_other_spellings(value: str, expected: bool) -> None:
    """The header checks already call these switch words; `LAGO_FAIL_OPEN=enabled` was refused."""
    assert settings_from(LAGO_FAIL_OPEN=value, LAGO_METRICS=value).fail_open is expected


def test_whole_numbers_written_with_a_decimal_point() -> None:
    """`3.0` from a templating tool that renders every number as a float was refused."""
    settings = settings_from(LAGO_MAX_RETRIES="3.0", LAGO_UNRESOLVED_STATUS="403.0")
    assert (settings.max_retries, settings.unresolved_status) == (3, 403)
    assert type(settings.max_retries) is int
    refused("LAGO_MAX_RETRIES", "3.5")


@pytest.mark.parametrize("variable", ["LAGO_FAIL_OPEN", "LAGO_API_TIMEOUT", "LAGO_MAX_RETRIES"])
def test_an_empty_value_says_to_unset_it_for_the_default(variable: str) -> None:
    """`- LAGO_FAIL_OPEN=${LAGO_FAIL_OPEN}` in compose with the host's variable unset: "got ''" did not say what
    to do."""
    assert "unset it" in str(refused(variable, " "))


# ----------------------------------------------------------------------------------------------- metrics


def test_a_collector_unregistered_is_registered_again_by_the_next_registration() -> None:
    """A fixture cleaning the registry between tests (or an app unregistering what it registered before being made
    again): the next registration returned True and nothing was exported again, ever."""
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    first = PipelineMetrics()
    assert first.register(registry)
    first.recorded = 5
    assert registry.get_sample_value("lago_billing_events_recorded_total") == 5
    for collector in list(registry._collector_to_names):
        registry.unregister(collector)
    assert registry.get_sample_value("lago_billing_events_recorded_total") is None
    second = PipelineMetrics()
    assert second.register(registry)
    second.recorded = 2
    assert registry.get_sample_value("lago_billing_events_recorded_total") == 2  # a new start, not 7
    assert second.register(registry)  # registered once: no duplicate-timeseries error


def test_a_middleware_made_again_after_its_registry_was_cleaned_exports_its_counts(fake_lago: Any) -> None:
    """The same through an app: requests served after the cleaning are counted on /metrics."""
    prometheus_client = pytest.importorskip("prometheus_client")
    fake_lago.add_billable_metric("api_call")
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    settings = BillingSettings(
        api_url=fake_lago.base_url, api_key=fake_lago.api_key, org_header="X-Org-Id", exclude_paths=("/metrics",)
    )
    registry = prometheus_client.CollectorRegistry()

    async def chat(request: Request) -> Response:
        return JSONResponse({"ok": True})

    def made() -> OrgBillingMiddleware:
        routes = [Route("/v1/chat", chat), Mount("/metrics", prometheus_client.make_asgi_app(registry=registry))]
        return OrgBillingMiddleware(
            Starlette(routes=routes), settings, transport=fake_lago.transport(), metrics_registry=registry
        )

    for _ in range(2):
        middleware = made()
        with TestClient(middleware) as http:
            assert http.get("/v1/chat", headers={"X-Org-Id": "org_a"}).status_code == 200
            metrics = http.get("/metrics/").text
        assert "lago_billing_requests_total 1.0" in metrics, metrics
        for collector in list(registry._collector_to_names):
            registry.unregister(collector)
    assert _metrics._registered  # (the module's table, still keyed by the registry)


def test_the_quota_variables_read_durations_and_switches_as_the_others_do() -> None:
    """``LAGO_QUOTA_PLAN_TTL=5m`` or ``LAGO_QUOTA_HEADERS=enabled`` were refused while ``LAGO_API_TIMEOUT=10s`` and
    ``LAGO_METRICS=enabled`` were read: one package, one way of writing a duration or a switch."""
    from lago_org_billing._quota import QuotaConfig

    config = QuotaConfig.from_env(
        {
            "LAGO_QUOTA_PLAN_TTL": "5m",
            "LAGO_QUOTA_COLD_TIMEOUT": "250ms",
            "LAGO_QUOTA_SETTLE_LAG": "1m30s",
            "LAGO_QUOTA_REDIS_RETRY": "2s",
            "LAGO_QUOTA_HEADERS": "disabled",
        }
    )
    assert (config.plan_ttl, config.cold_timeout, config.settle_lag, config.redis_retry_interval) == (
        300.0,
        0.25,
        90.0,
        2.0,
    )
    assert config.headers is False
    with pytest.raises(ConfigurationError, match="LAGO_QUOTA_REFRESH_RATE must be a number"):
        QuotaConfig.from_env({"LAGO_QUOTA_REFRESH_RATE": "5s"})  # (a rate, not a duration)
    with pytest.raises(ConfigurationError, match="LAGO_QUOTA_PLAN_TTL must be a number of seconds"):
        QuotaConfig.from_env({"LAGO_QUOTA_PLAN_TTL": "5 parsecs"})
