"""Configuration as deployments write it (``.env`` files as python-dotenv reads them, values from the
environment as docker, compose, Kubernetes and PaaS secrets pass them) and the Prometheus series under org churn.

Covered: a ``.env`` saved with a byte-order mark (Windows editors, PowerShell), a commented-out placeholder
(``LAGO_WEBHOOK_HMAC_KEY= # set in prod``), quoted values holding `` #``, ``"``, ``\\`` or ``=`` (secrets, Redis
passwords, JSON limits), multi-line quoted JSON, ``export`` lines after a plain line of the same name, a ``.env``
that is not UTF-8, JSON limits with a BOM and CRLF from the environment; the HMAC key as a webhook receiver built
with no arguments reads it; one series per metric and label set whatever the number of orgs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lago_org_billing import BillingSettings, ConfigurationError, LagoWebhooks, OrgBillingMiddleware
from lago_org_billing._webhooks import sign_hmac

SECRET = "5b1e6c1a-0d6f-4e0e-9a57-3f0c9c3d2b11"


def from_file(tmp_path: Path, text: str | bytes, **environ: str) -> BillingSettings:
    env = tmp_path / ".env"
    if isinstance(text, str):
        env.write_bytes(text.encode())  # (bytes as written: no newline translation)
    else:
        env.write_bytes(text)
    return BillingSettings.from_env(env, environ=environ, require_api_key=False)


# ---------------------------------------------------------------------------------------------- .env encoding


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_dotenv_saved_with_a_byte_order_mark_reads_its_first_line(tmp_path: Path, newline: str) -> None:
    """Notepad ("UTF-8 with BOM"), PowerShell's `Set-Content -Encoding utf8` and Visual Studio start the file with
    U+FEFF: its first line was read under the name `\\ufeffLAGO_QUOTA_MODE` and silently ignored (the gate enforced
    where `monitor` was written). python-dotenv drops the mark."""
    text = f"\ufeffLAGO_QUOTA_MODE=monitor{newline}LAGO_API_KEY={SECRET}{newline}"
    settings = from_file(tmp_path, text)
    assert settings.quota_mode == "monitor" and settings.api_key == SECRET


@pytest.mark.parametrize("encoded", ["LAGO_QUOTA_MODE=monitor\n".encode("utf-16"), b"# caf\xe9\nLAGO_QUOTA_MODE=off\n"])
def test_a_dotenv_in_another_encoding_is_a_configuration_error(tmp_path: Path, encoded: bytes) -> None:
    """A `.env` written by PowerShell 5's `>` (UTF-16) or a Latin-1 editor was a bare `UnicodeDecodeError` from
    deep inside starlette, naming no file and saying nothing to do."""
    with pytest.raises(ConfigurationError, match="UTF-8") as info:
        from_file(tmp_path, encoded)
    assert str(tmp_path / ".env") in str(info.value)


# ------------------------------------------------------------------------------------------- comments, quotes


@pytest.mark.parametrize(
    ("variable", "field"),
    [
        ("LAGO_WEBHOOK_HMAC_KEY", "webhook_hmac_key"),
        ("LAGO_SPOOL_PATH", "spool_path"),
        ("LAGO_ORGANIZATION_ID", "organization_id"),
        ("LAGO_ORG_HEADER", "org_header"),
    ],
)
def test_a_commented_out_placeholder_is_an_empty_value(tmp_path: Path, variable: str, field: str) -> None:
    """`LAGO_WEBHOOK_HMAC_KEY= # set in prod` is empty to python-dotenv and compose. It was read as the text of the
    comment: an HMAC key `# set in prod` (every webhook a 401), a spool file named `# durable spool` in the working
    directory, every webhook refused as another organization's."""
    settings = from_file(tmp_path, f"{variable}= # set in prod\nLAGO_API_KEY={SECRET}\n")
    assert getattr(settings, field) is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('"Zx #9q"', "Zx #9q"),
        ("'Zx #9q'", "Zx #9q"),
        ('"ab\\"cd"', 'ab"cd'),
        ('"ab\\\\cd"', "ab\\cd"),
        ("'it\\'s'", "it's"),
        ('"k=v=="', "k=v=="),
        ("'say \"hi\"'", 'say "hi"'),
        ('"quoted"   # the staging key', "quoted"),
        ("ab#cd==", "ab#cd=="),
    ],
)
def test_a_quoted_secret_in_a_dotenv_keeps_every_character(tmp_path: Path, line: str, expected: str) -> None:
    """A secret with ` #` must be quoted in a `.env` (python-dotenv, compose): quoted, it was refused as ending with
    an inline comment (there is none) and could not be set from the file at all. Escapes in double quotes were kept
    (`\\"` read as two characters): an HMAC key silently changed, every webhook a 401."""
    settings = from_file(tmp_path, f"LAGO_WEBHOOK_HMAC_KEY={line}\n")
    assert settings.webhook_hmac_key == expected


def test_an_unquoted_inline_comment_is_still_refused(tmp_path: Path) -> None:
    """What the reader leaves to the existing check: an unquoted ` # ...` (python-dotenv drops it, starlette kept it:
    refused rather than read one way or the other), and a quoted value whose content is itself wrapped in quotes."""
    with pytest.raises(ConfigurationError, match="comment") as info:
        from_file(tmp_path, "LAGO_EXCLUDE_PATHS=/health # probes\n")
    assert info.value.variable == "LAGO_EXCLUDE_PATHS"
    assert from_file(tmp_path, 'LAGO_EXCLUDE_PATHS="/health,/metrics" # probes\n').exclude_paths == (
        "/health",
        "/metrics",
    )
    with pytest.raises(ConfigurationError, match="quotes"):
        from_file(tmp_path, "LAGO_EVENT_CODE=\"'api_call'\"\n")


@pytest.mark.anyio
async def test_a_webhook_receiver_built_with_no_arguments_verifies_with_the_quoted_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Route(path, LagoWebhooks(), methods=["POST"])` reads `.env` from the working directory: a key written as
    python-dotenv requires it verifies Lago's signatures (it made the receiver fail on every delivery)."""
    key = 'Zx#9 "q\\w=='
    (tmp_path / ".env").write_text('LAGO_WEBHOOK_HMAC_KEY="Zx#9 \\"q\\\\w=="\n')
    monkeypatch.chdir(tmp_path)
    body = b'{"webhook_type":"invoice.created","object_type":"invoice","invoice":{"lago_id":"inv-1"}}'
    seen: list[str] = []

    async def handler(event: Any) -> None:
        seen.append(event.webhook_type)

    app = Starlette(routes=[Route("/webhooks/lago", LagoWebhooks(handlers={"*": handler}), methods=["POST"])])
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


# ------------------------------------------------------------------------------------------------ JSON limits


LIMITS = {"starter": {"max_api_calls": 300, "max_tokens": 100000}}


@pytest.mark.parametrize(
    "text",
    [
        'LAGO_PLAN_LIMITS="{\\"starter\\": {\\"max_api_calls\\": 300, \\"max_tokens\\": 100000}}"\n',
        'LAGO_PLAN_LIMITS=\'{\n  "starter": {"max_api_calls": 300, "max_tokens": 100000}\n}\'\nLAGO_QUOTA_MODE=off\n',
        'LAGO_PLAN_LIMITS={"starter": {"max_api_calls": 300, "max_tokens": 100000}}\n',
    ],
    ids=["double-quoted-escaped", "multi-line", "unquoted"],
)
def test_json_limits_written_for_dotenv_are_read(tmp_path: Path, text: str) -> None:
    """The two ways python-dotenv and compose document for JSON in a `.env`: escaped quotes inside double quotes,
    and a multi-line single-quoted block. Both were refused as invalid JSON (the backslashes, the first line only)."""
    assert from_file(tmp_path, text).plan_limits == LIMITS


def test_json_limits_from_the_environment_with_a_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    """`LAGO_PLAN_LIMITS="$(cat limits.json)"` of a file saved on Windows: a BOM (refused: "Unexpected UTF-8 BOM")
    and CRLF line ends (blanks to JSON)."""
    raw = '\ufeff{\r\n  "starter": {"max_api_calls": 300, "max_tokens": 100000}\r\n}\r\n'
    settings = BillingSettings.from_env(None, environ={"LAGO_PLAN_LIMITS": raw}, require_api_key=False)
    assert settings.plan_limits == LIMITS


# ------------------------------------------------------------------------------------------ several lines


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("LAGO_QUOTA_MODE=enforce\nexport LAGO_QUOTA_MODE=monitor\n", "monitor"),
        ("export LAGO_QUOTA_MODE=monitor\nLAGO_QUOTA_MODE=off\n", "off"),
        ("LAGO_QUOTA_MODE=monitor\nLAGO_QUOTA_MODE=off\n", "off"),
    ],
)
def test_the_last_line_of_a_variable_wins_as_a_shell_reads_it(tmp_path: Path, text: str, expected: str) -> None:
    """`set -a; . ./.env` and python-dotenv take a variable's last line. A plain line always won over an `export`
    one, wherever it stood: a staging override appended as `export LAGO_QUOTA_MODE=monitor` was ignored."""
    assert from_file(tmp_path, text).quota_mode == expected


def test_an_environment_value_still_wins_over_the_file(tmp_path: Path) -> None:
    settings = from_file(tmp_path, 'LAGO_WEBHOOK_HMAC_KEY="from file"\n', LAGO_WEBHOOK_HMAC_KEY="a #b")
    assert settings.webhook_hmac_key == "a #b"


# ----------------------------------------------------------------------------------------------------- metrics


@pytest.mark.anyio
async def test_metric_series_do_not_grow_with_the_number_of_orgs(fake_lago: Any) -> None:
    """No org (nor user, path) is a label: scraping after 5 orgs and after 40 more gives the same series; the one
    label is `status` of `lago_errors_total`. The contract's names are exported."""
    prometheus_client = pytest.importorskip("prometheus_client")
    fake_lago.add_billable_metric("api_call")
    fake_lago.add_plan("starter", amount_cents=0)

    async def endpoint(request: Request) -> Response:
        return JSONResponse({"ok": True})

    settings = BillingSettings(
        api_url=fake_lago.base_url, api_key=fake_lago.api_key, org_header="X-Org-Id", retry_backoff=0.001
    )
    registry = prometheus_client.CollectorRegistry()
    app = OrgBillingMiddleware(
        Starlette(routes=[Route("/v1/{item}", endpoint)]),
        settings,
        transport=fake_lago.transport(),
        metrics_registry=registry,
    )

    def series() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        return {
            (sample.name, tuple(sorted(sample.labels.items())))
            for family in registry.collect()
            for sample in family.samples
        }

    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            for index in range(45):
                org = f"org_{index}"
                if index % 2:
                    fake_lago.add_subscription(org, "starter", external_id=org)
                await http.get(f"/v1/item-{index}", headers={"X-Org-Id": org})
                if index == 4:
                    assert await app.pipeline.flush(5)
                    first = series()
        assert await app.pipeline.flush(5)
        after = series()
    finally:
        await app.aclose()
    labelled = {labels for _, labels in after if labels}
    assert all(re.fullmatch(r"(le|status)", name) for labels in labelled for name, _ in labels), labelled
    assert {name for name, _ in after} == {name for name, _ in first}
    assert len(after) == len(first)
    names = {name for name, _ in after}
    for name in ("lago_billing_requests_total", "lago_billing_requests_billed_total", "lago_billing_queue_depth"):
        assert name in names


# ------------------------------------------------------------------------------------------------ LAGO_API_URL


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://api.getlago.com/?", "https://api.getlago.com"),
        ("http://lago:3000/api/v1?\n", "http://lago:3000"),
        ("https://lago.example.com/API/V1/", "https://lago.example.com"),
        ("https://lago.example.com/billing/api/v1#", "https://lago.example.com/billing"),
    ],
)
def test_api_url_pasted_with_an_empty_query_or_in_capitals_is_the_base(value: str, expected: str) -> None:
    """A trailing `?` (or `#`) passed the check (an empty query is no query) and stayed: httpx then called
    `https://api.getlago.com/?/api/v1/events`, every call to Lago's front page. `/API/V1` was kept as a base path
    (calls to `/API/V1/api/v1/...`, each a 404)."""
    settings = BillingSettings.from_env(None, environ={"LAGO_API_URL": value}, require_api_key=False)
    assert settings.api_url == expected
    assert BillingSettings(api_url=value).api_url == expected


def test_quota_variables_in_a_dotenv_are_read_as_the_other_settings_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``QuotaConfig.from_env`` read ``.env`` through starlette: with a byte-order mark its first line was dropped
    (``LAGO_QUOTA_STATUS=402`` ignored: 429 answered), and a commented-out placeholder was the feature ``# our
    feature`` (no org's plan has it: every org unlimited, silently)."""
    from lago_org_billing._quota import QuotaConfig

    for name in ("LAGO_QUOTA_STATUS", "LAGO_QUOTA_FEATURE", "LAGO_QUOTA_REDIS_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text(
        "\ufeffLAGO_QUOTA_STATUS=402\r\n"
        "LAGO_QUOTA_FEATURE= # our feature, later\r\n"
        'LAGO_QUOTA_REDIS_PREFIX="q #1:"\r\n',
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    config = QuotaConfig.from_env()
    assert config.over_quota_status == 402
    assert config.feature_code == QuotaConfig().feature_code
    assert config.redis_prefix == "q #1:"
