"""Re-review of two fresh fixes: settings as deployments write them (8c0b805) and memory bounds (66faae5).

Covered: a spool path given as a ``pathlib.Path`` in code, the default ``retry_deadline`` as a plain number
(serialisers, ``replace``, pickling, copies), API keys pasted with typographic quotes or invisible characters,
``.env`` lines written for ``source`` (``export LAGO_...=``), the ``migrate --help`` naming the variables it connects
with, and long ``X-Lago-Unique-Key`` deliveries deduplicated across a failed attempt, its retry and a later copy, in
the memory and the Redis stores, while handlers still see the key as Lago sent it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.routing import Route

from lago_org_billing import BillingSettings, ConfigurationError
from lago_org_billing._webhooks import LagoWebhooks, MemoryDedupe, RedisDedupe, sign_hmac
from lago_org_billing.cli import main

SECRET = "5b1e6c1a-0d6f-4e0e-9a57-3f0c9c3d2b11"


# ------------------------------------------------------------------------------------------ LAGO_SPOOL_PATH


def test_spool_path_given_as_a_path_object_is_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`BillingSettings(spool_path=tmp_path / "spool.db")` (what `pathlib` code writes, and worked before) raised
    `AttributeError: 'PosixPath' object has no attribute 'strip'` once `~` expansion came in."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert BillingSettings(spool_path=tmp_path / "spool.db").spool_path == str(tmp_path / "spool.db")
    assert BillingSettings(spool_path=Path("~/spool.db")).spool_path == str(tmp_path / "spool.db")
    with pytest.raises(ConfigurationError, match="LAGO_SPOOL_PATH"):
        BillingSettings(spool_path=Path(":memory:"))
    with pytest.raises(ConfigurationError, match="LAGO_SPOOL_PATH"):
        BillingSettings(spool_path=3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- LAGO_RETRY_DEADLINE default


def test_default_retry_deadline_is_a_plain_number_to_serialisers() -> None:
    """The default deadline was kept as a `float` subclass: `yaml.safe_dump(dataclasses.asdict(settings))` raised
    `RepresenterError` and `orjson.dumps(settings)` `TypeError` (both worked before), for every settings object
    that leaves LAGO_RETRY_DEADLINE alone."""
    settings = BillingSettings(api_key=SECRET, api_timeout=60)
    assert type(settings.retry_deadline) is float and settings.retry_deadline == 60
    assert yaml.safe_load(yaml.safe_dump(dataclasses.asdict(settings)))["retry_deadline"] == 60
    assert json.loads(json.dumps(dataclasses.asdict(settings)))["retry_deadline"] == 60
    orjson = pytest.importorskip("orjson")
    assert json.loads(orjson.dumps(settings))["retry_deadline"] == 60


def test_default_retry_deadline_follows_the_timeout_through_copies() -> None:
    """Left at its default, the deadline follows LAGO_API_TIMEOUT through `replace`, pickling and copies; one set
    explicitly (even to the default's value) stays as set."""
    grown = BillingSettings(api_timeout=60)
    assert grown.replace(api_timeout=5).retry_deadline == 30
    assert BillingSettings().replace(api_timeout=90).retry_deadline == 90
    for clone in (pickle.loads(pickle.dumps(grown)), copy.copy(grown), copy.deepcopy(grown)):
        assert clone == grown and clone.replace(api_timeout=120).retry_deadline == 120
    assert grown.replace(retry_deadline=45).retry_deadline == 45
    assert grown.replace(retry_deadline=45).replace(api_timeout=120).retry_deadline == 45
    explicit = BillingSettings(retry_deadline=30.0)
    assert explicit == BillingSettings() and explicit.replace(api_timeout=60).retry_deadline == 30
    from_env = BillingSettings.from_env(None, environ={"LAGO_API_KEY": "k", "LAGO_API_TIMEOUT": "45"})
    assert from_env.retry_deadline == 45 and from_env.replace(api_timeout=2).retry_deadline == 30


# --------------------------------------------------------------------------------------------- LAGO_API_KEY


@pytest.mark.parametrize(
    "value",
    [f"\u201c{SECRET}\u201d", f"\u2018{SECRET}\u2019", f"{SECRET}\u200b", f"\ufeff{SECRET}", f"{SECRET}\x00"],
)
def test_an_api_key_with_characters_no_key_has_is_refused(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key pasted from a chat or a document with typographic quotes, a zero-width space or a byte-order mark passed
    the new checks (they look for ASCII quotes and blanks) and failed at the first use: `UnicodeEncodeError:
    'ascii' codec can't encode character` from httpx (a traceback from `lago-org-billing health`, a crash of the
    app's startup), naming no variable. Refused as the blank-containing key is, without echoing the key."""
    with pytest.raises(ConfigurationError) as info:
        BillingSettings.from_env(None, environ={"LAGO_API_KEY": value})
    assert info.value.variable == "LAGO_API_KEY" and SECRET not in str(info.value)
    if "\x00" in value:  # (a process environment cannot hold it; settings built in code can)
        return
    monkeypatch.setenv("LAGO_API_KEY", value)
    monkeypatch.chdir(Path(__file__).parent)  # (no .env there)
    assert main(["health"]) == 2
    err = capsys.readouterr().err
    assert "LAGO_API_KEY" in err and SECRET not in err


def test_an_hmac_key_keeps_what_lago_may_put_in_it() -> None:
    """The HMAC key is only stripped: its bytes are the key (UTF-8), whatever they are."""
    assert BillingSettings(webhook_hmac_key=" cl\u00e9 du webhook\n").webhook_hmac_key == "cl\u00e9 du webhook"


def test_legitimate_values_near_the_new_checks_are_kept(tmp_path: Path) -> None:
    """What the new checks must not catch: headers whose name starts with a switch word, a path with a blank or
    quotes inside, JSON limits, an exclusion whose segment has a blank."""
    settings = BillingSettings.from_env(
        None,
        environ={
            "LAGO_API_KEY": SECRET,
            "LAGO_ORG_HEADER": "Yes-Org",
            "LAGO_USER_HEADER": "On-Behalf-Of",
            "LAGO_SPOOL_PATH": f'{tmp_path}/my "billing" spool.db',
            "LAGO_EXCLUDE_PATHS": "/files/My Docs,/http_status",
            "LAGO_PLAN_LIMITS": '{"pro": {"max_api_calls": 1000}}',
        },
    )
    assert (settings.org_header, settings.user_header) == ("Yes-Org", "On-Behalf-Of")
    assert settings.spool_path == f'{tmp_path}/my "billing" spool.db'
    assert settings.exclude_paths == ("/files/My Docs", "/http_status")
    assert settings.plan_limits == {"pro": {"max_api_calls": 1000}}


# ------------------------------------------------------------------------------------------------ .env files


def test_dotenv_lines_written_for_source_are_read(tmp_path: Path) -> None:
    """A `.env` also sourced by a shell (`set -a; . ./.env`) or written for python-dotenv has `export LAGO_X=...`
    lines: they were silently skipped (starlette reads the name `export LAGO_X`): LAGO_QUOTA_MODE=monitor ignored,
    the gate enforced; LAGO_API_URL ignored, localhost:3000 used."""
    env = tmp_path / ".env"
    env.write_text(
        f"export LAGO_API_KEY={SECRET}\nexport  LAGO_QUOTA_MODE=monitor\nLAGO_API_URL=http://lago.internal:3000\n"
        "export LAGO_EXCLUDE_PATHS='/health,/metrics'\n"
    )
    settings = BillingSettings.from_env(env, environ={})
    assert settings.api_key == SECRET and settings.quota_mode == "monitor"
    assert settings.api_url == "http://lago.internal:3000" and settings.exclude_paths == ("/health", "/metrics")
    # the environment still wins over the file
    assert BillingSettings.from_env(env, environ={"LAGO_QUOTA_MODE": "off"}).quota_mode == "off"


@pytest.mark.parametrize(
    ("line", "variable"),
    [
        ("LAGO_EXCLUDE_PATHS=/health,/metrics  # k8s probes", "LAGO_EXCLUDE_PATHS"),
        ("LAGO_SPOOL_PATH=/var/lib/app/spool.db # durable", "LAGO_SPOOL_PATH"),
        (f"LAGO_API_KEY={SECRET} # prod", "LAGO_API_KEY"),
    ],
)
def test_a_dotenv_inline_comment_is_refused_not_read_as_the_value(tmp_path: Path, line: str, variable: str) -> None:
    """python-dotenv and compose drop ` # comment` after an unquoted value; starlette's reader kept it: probes
    billed and gated (`/metrics  # k8s probes` matched no path), a spool file named `spool.db # durable`."""
    env = tmp_path / ".env"
    env.write_text(f"{line}\nLAGO_API_KEY=k\n" if variable != "LAGO_API_KEY" else f"{line}\n")
    with pytest.raises(ConfigurationError, match="comment") as info:
        BillingSettings.from_env(env, environ={})
    assert info.value.variable == variable and SECRET not in str(info.value)
    # the same characters set in the environment are the value's own (docker --env-file keeps them)
    assert BillingSettings.from_env(env, environ={variable: "/a#b", "LAGO_API_KEY": "k"}) is not None


# --------------------------------------------------------------------------------------------------- the CLI


def test_migrate_help_names_the_variables_it_connects_with(capsys: pytest.CaptureFixture[str]) -> None:
    """`migrate --help` said which Lago objects it touches, not which Lago: LAGO_API_URL / LAGO_API_KEY (and .env)."""
    with pytest.raises(SystemExit) as info:
        main(["migrate", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in ("LAGO_API_URL", "LAGO_API_KEY", "LAGO_SUBSCRIPTION_ID_TEMPLATE", ".env"):
        assert name in text


# -------------------------------------------------------------------------------- long webhook unique keys

HMAC_KEY = "rereview-hmac-key"
BODY = (
    b'{"webhook_type":"invoice.created","object_type":"invoice","organization_id":"lago-org",'
    b'"invoice":{"lago_id":"inv-1","external_customer_id":"org_a"}}'
)


def _headers(unique_key: str) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "x-lago-signature": sign_hmac(BODY, HMAC_KEY),
        "x-lago-signature-algorithm": "hmac",
        "x-lago-unique-key": unique_key,
    }


@pytest.mark.anyio
@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_long_unique_key_is_deduplicated_across_failure_retry_and_copy(
    store: str, request: pytest.FixtureRequest
) -> None:
    """A long key's delivery whose handler fails is run again on Lago's retry (the claim released under the digest
    it was taken under), then a later copy is a duplicate; handlers see the key as sent, and so does the answer."""
    seen: list[str | None] = []
    fail = [True]

    async def handler(event: Any) -> None:
        seen.append(event.unique_key)
        if fail.pop() if fail else False:
            raise RuntimeError("first attempt fails")

    client: Any = None
    dedupe: MemoryDedupe | RedisDedupe
    if store == "redis":
        import redis.asyncio as redis_asyncio

        client = redis_asyncio.from_url(request.getfixturevalue("redis_url"))
        prefix = f"rereview-{uuid.uuid4().hex}:"
        dedupe = RedisDedupe(client=client, prefix=prefix)
    else:
        dedupe = MemoryDedupe()
    receiver = LagoWebhooks(
        BillingSettings(api_key="k", webhook_hmac_key=HMAC_KEY), handlers={"*": handler}, dedupe=dedupe
    )
    app = Starlette(routes=[Route("/webhooks/lago", receiver, methods=["POST"])])
    key = "retry-" + "k" * 300
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            first = await http.post("/webhooks/lago", content=BODY, headers=_headers(key))
            assert first.status_code == 500
            retry = await http.post("/webhooks/lago", content=BODY, headers=_headers(f" {key} "))
            assert retry.status_code == 200 and retry.json()["status"] == "processed"
            assert retry.json()["unique_key"] == key
            again = await http.post("/webhooks/lago", content=BODY, headers=_headers(key))
            assert again.json()["status"] == "duplicate"
        assert seen == [key, key]
        if isinstance(dedupe, MemoryDedupe):
            assert dedupe._processing == {} and len(dedupe) == 1
        else:
            names = [name async for name in client.scan_iter(match=dedupe.prefix + "*")]
            assert len(names) == 1 and len(names[0]) < len(dedupe.prefix) + 100
    finally:
        if client is not None:
            await client.aclose()
