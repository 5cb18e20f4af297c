"""Where settings given in code (a client's, an ``env_file``'s) are silently replaced by the process
environment, and a quota configuration that cannot mean what it says.

* ``OrgBillingMiddleware(app, client=c)`` (or ``pipeline=EventPipeline(c)``) reads its own settings from the
  environment instead of ``c.settings``, as ``OrgBilling(client=c)`` and ``LagoWebhooks(client=c)`` take them: with no
  ``LAGO_API_KEY`` in the environment it refuses to start ("LAGO_API_KEY is not set", though the client has one), and
  with one it bills with the environment's template, org header and quota mode, not the client's settings.
* ``BillingSettings.from_env("deploy/lago.env")`` reads ``LAGO_FAIL_OPEN`` from that file, but the middleware's gate
  reads the ``LAGO_QUOTA_*`` variables of that same file from ``./.env`` only: ignored without a word.
* ``LAGO_QUOTA_TOKENS_PRIVILEGE`` set to the calls privilege's name (or the reverse) is taken: the calls limit then caps
  tokens too (300 calls a period became 300 tokens a period) and orgs are refused long before their plan's limit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from _lifespan import serving_lifespan
from lago_org_billing import (
    BillingSettings,
    ConfigurationError,
    EventPipeline,
    LagoClient,
    OrgBilling,
    OrgBillingMiddleware,
)
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

KEY = "test-key"


def _client_settings(**changes: Any) -> BillingSettings:
    """Settings written in code, as a user hands them to a LagoClient shared by the middleware and OrgBilling."""
    return BillingSettings(
        api_key=KEY,
        api_url="http://lago.test",
        org_header="X-Org-Id",
        subscription_id_template="sub_{org_id}",
        quota_mode="off",
        **changes,
    )


def _lago() -> FakeLago:
    lago = FakeLago(api_key=KEY)
    lago.add_plan("starter", amount_cents=0)
    lago.add_subscription("org_a", "starter", external_id="sub_org_a")
    return lago


async def _ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def _app() -> Starlette:
    return Starlette(routes=[Route("/ok", _ok)])


# ------------------------------------------------------------------------- client= / pipeline= without settings=


@pytest.mark.parametrize("given", ["client", "pipeline"])
def test_middleware_given_a_client_starts_without_lago_variables_in_the_environment(given: str) -> None:
    """The client holds the key and the URL (as ``OrgBilling(client=c)`` reads them): the middleware must not refuse
    to start with "LAGO_API_KEY is not set" because the process environment has none."""
    assert not [name for name in os.environ if name.startswith("LAGO_")]
    client = LagoClient(_client_settings(), transport=_lago().transport())
    injected: dict[str, Any] = {"client": client} if given == "client" else {"pipeline": EventPipeline(client)}
    middleware = OrgBillingMiddleware(_app(), **injected)  # raised ConfigurationError: LAGO_API_KEY is not set
    assert middleware.settings is client.settings


def test_middleware_given_a_client_uses_its_settings_as_orgbilling_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """One client shared by OrgBilling and the middleware: both bill with the client's settings (template, org
    header, quota mode), not OrgBilling with the client's and the middleware with the environment's."""
    monkeypatch.setenv("LAGO_API_KEY", KEY)  # (a .env or a deployment's variable: the key, nothing else)
    client = LagoClient(_client_settings(), transport=_lago().transport())
    billing = OrgBilling(client=client)
    middleware = OrgBillingMiddleware(_app(), client=client)
    assert billing.settings.subscription_id_for("org_a") == "sub_org_a"
    assert middleware.settings.subscription_id_for("org_a") == "sub_org_a"  # was "org_a" (the environment's default)
    assert middleware.settings.org_header == "X-Org-Id"  # was None: every request unresolved, served unbilled
    assert middleware.quota is None  # the client's quota_mode="off"; was the environment's "enforce"


async def test_a_request_through_a_middleware_given_a_client_is_billed_to_the_clients_subscription(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """End to end: org_a's request is billed once, to ``sub_org_a`` (the client's template). It was served and never
    billed: the middleware took its settings from the environment (no LAGO_ORG_HEADER there: org unresolved)."""
    monkeypatch.setenv("LAGO_API_KEY", KEY)
    lago = _lago()
    client = LagoClient(_client_settings(), transport=lago.transport())
    middleware = OrgBillingMiddleware(_app(), client=client, quota=None)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http,
        serving_lifespan(middleware),
    ):
        answer = await http.get("/ok", headers={"X-Org-Id": "org_a"})
        await middleware.pipeline.flush(10)
    assert answer.status_code == 200
    assert [event["external_subscription_id"] for event in lago.events] == ["sub_org_a"]
    await client.aclose()


# ------------------------------------------------------------------------- LAGO_QUOTA_* of from_env's env_file


@pytest.fixture
def in_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_quota_variables_of_the_env_file_given_to_from_env_are_read_by_the_middlewares_gate(in_dir: Path) -> None:
    """``BillingSettings.from_env("deploy/lago.env")`` takes LAGO_FAIL_OPEN from that file; the LAGO_QUOTA_* lines of
    the same file must reach the automatic gate too. They were ignored (the gate read ./.env only): orgs without a
    subscription blocked (402) though the file says allow, and 429 answered though it says 402."""
    (in_dir / "deploy").mkdir()
    (in_dir / "deploy" / "lago.env").write_text(
        "LAGO_API_KEY=k\nLAGO_FAIL_OPEN=false\nLAGO_QUOTA_NO_SUBSCRIPTION=allow\nLAGO_QUOTA_STATUS=402\n"
    )
    settings = BillingSettings.from_env("deploy/lago.env")
    assert settings.fail_open is False  # (read from the file)
    middleware = OrgBillingMiddleware(_app(), settings, transport=_lago().transport())
    assert isinstance(middleware.quota, QuotaGate)
    assert middleware.quota.config.no_subscription == "allow"  # was "block"
    assert middleware.quota.config.over_quota_status == 402  # was 429


# ------------------------------------------------------------------------- one privilege for calls and tokens


@pytest.mark.parametrize(
    "environ",
    [
        {"LAGO_QUOTA_TOKENS_PRIVILEGE": "max_api_calls"},
        {"LAGO_QUOTA_CALLS_PRIVILEGE": "max_tokens"},
        {"LAGO_QUOTA_CALLS_PRIVILEGE": "max_requests", "LAGO_QUOTA_TOKENS_PRIVILEGE": "max_requests"},
    ],
    ids=["tokens-named-as-calls", "calls-named-as-tokens", "both-the-same"],
)
def test_one_privilege_named_for_both_calls_and_tokens_is_refused(environ: dict[str, str]) -> None:
    """A limit of calls is no limit of tokens: the same privilege named for both made its value cap both (300 calls a
    period, 300 tokens a period), and the org's requests were refused long before its plan's limits."""
    with pytest.raises(ConfigurationError) as caught:
        QuotaConfig.from_env(environ)
    message = str(caught.value)
    assert "LAGO_QUOTA_CALLS_PRIVILEGE" in message and "LAGO_QUOTA_TOKENS_PRIVILEGE" in message, message


# ------------------------------------------------------------------------- the JWT issuer LAGO_API_URL stands for


@pytest.mark.parametrize(
    "api_url",
    ["https://api.getlago.com:443", "HTTPS://API.getlago.com", "https://user:secret@api.getlago.com"],
    ids=["default-port-written", "upper-case", "userinfo"],
)
async def test_lago_webhooks_take_lagos_issuer_for_the_lago_api_url_written_another_way(api_url: str) -> None:
    """LAGO_API_URL accepted as written (an explicit :443, upper case, a user:password@ the client strips and only
    warns about) is the same Lago as Lago's own ``iss`` (https://api.getlago.com): its JWT webhooks must verify. The
    default issuer compared the text as written, so every webhook was answered 401 and lost after Lago's 3 attempts."""
    from lago_org_billing import LagoWebhooks
    from test_webhooks import SUB_STARTED, _keys, app_for, jwt_headers

    keys = _keys()
    received: list[Any] = []

    async def handler(event: Any) -> None:
        received.append(event)

    receiver = LagoWebhooks(BillingSettings(api_url=api_url), public_key=keys.public.decode(), handlers={"*": handler})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app_for(receiver)), base_url="http://app") as http:
        answer = await http.post(
            "/webhooks/lago",
            content=SUB_STARTED,
            headers=jwt_headers(SUB_STARTED, keys.private, issuer="https://api.getlago.com"),
        )
    assert answer.status_code == 200, answer.text
    assert len(received) == 1


async def test_the_password_of_lago_api_url_never_appears_in_a_webhooks_issuer_refusal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """README: "the passwords of LAGO_API_URL (shown :***@) never appear". A Lago-signed JWT of another issuer (another
    Lago, or a Lago Cloud account pointing its webhooks here) was answered 401 with the expected issuer, the
    LAGO_API_URL password in clear, in the body (which Lago keeps in the sender's webhook logs) and in the log."""
    from lago_org_billing import LagoWebhooks
    from test_webhooks import SUB_STARTED, _keys, app_for, jwt_headers

    keys = _keys()
    receiver = LagoWebhooks(
        BillingSettings(api_url="https://user:s3cr3t-pass@lago.example"), public_key=keys.public.decode()
    )
    caplog.set_level("DEBUG")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app_for(receiver)), base_url="http://app") as http:
        answer = await http.post(
            "/webhooks/lago",
            content=SUB_STARTED,
            headers=jwt_headers(SUB_STARTED, keys.private, issuer="https://other-lago.example"),
        )
    assert answer.status_code == 401
    assert "s3cr3t-pass" not in answer.text, answer.text
    assert "s3cr3t-pass" not in caplog.text, caplog.text
