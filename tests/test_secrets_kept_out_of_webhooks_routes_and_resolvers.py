"""Review (angle: secrets never leak, second round): the webhook receiver, the billing routes and their dashboard,
and the commands (``migrate``, ``--verify``, ``health``, ``dead-letters``, ``emulator``, ``demo``).

Secrets: ``LAGO_API_KEY``, the webhook HMAC key, the password of ``LAGO_REDIS_URL`` (the webhooks' dedupe store)
and of a ``LAGO_API_URL`` with ``user:password@``, and the JWT bearer tokens, JWT signing keys and cookies of the
requests reaching the billing routes. None may show in an answer, on stdout/stderr, in a log record at any level
(its text, and the locals of the frames of the exception it carries: Sentry's logging integration,
``include_local_variables`` on by default, ships them), nor in an exception's str, repr, attributes and the locals
of its traceback's frames (this test's own frames left out), through its whole cause/context chain.

Failures are real: a Redis that refuses AUTH or is down, a Redis URL redis-py cannot read, the redis extra missing,
an HMAC key given in quotes, bad signatures and malformed bodies, Lago (the emulator) refusing the key or failing,
an ``authorize``/``plans`` callback that raises while decoding an expired JWT, settings that are refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount, Route

from lago_org_billing import (
    BillingSettings,
    ConfigurationError,
    LagoClient,
    LagoWebhooks,
    OrgBillingMiddleware,
    billing_routes,
)
from lago_org_billing._webhooks import sign_hmac
from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago
from test_secrets_kept_out_of_logs_errors_and_tracebacks import _free_port, _leaks as _leaks_of, _logged

jwt = pytest.importorskip("jwt")

KEY = "sk_live_REVIEW2SECRET_4e1d"
HMAC_KEY = "whsec_REVIEW2HMAC_c0ffee"
REDIS_PASSWORD = "R3disPa55two"
URL_PASSWORD = "UrlPa55wordTwo"
JWT_SECRET = "jwt-signing-secret-of-the-app-0123456789abcdef"
COOKIE_VALUE = "C00kieSessionVALUE7"
SECRETS = (KEY, HMAC_KEY, REDIS_PASSWORD, URL_PASSWORD, JWT_SECRET, COOKIE_VALUE)


# ----------------------------------------------------------------------------------------------------------- helpers


def _leaks(exc: BaseException, *secrets: str) -> list[str]:
    return _leaks_of(exc, *secrets, own=__file__)


def _log_leaks(caplog: pytest.LogCaptureFixture, *secrets: str) -> list[str]:
    """Every record as a handler writes it (message, arguments, formatted traceback), and the exception it carries
    as an error tracker reads it (:func:`_leaks`)."""
    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
    found: list[str] = []
    for record in caplog.records:
        text = formatter.format(record)
        found += [f"log text: {text[:200]}" for secret in secrets if secret in text]
        if record.exc_info and record.exc_info[1] is not None:
            found += [f"log exc_info: {leak}" for leak in _leaks(record.exc_info[1], *secrets)]
    return found


def _expired_token() -> str:
    return str(jwt.encode({"sub": "user_1", "exp": int(time.time()) - 3600}, JWT_SECRET, algorithm="HS256"))


def _webhook_body() -> bytes:
    return json.dumps(
        {"webhook_type": "invoice.created", "object_type": "invoice", "invoice": {"lago_id": "inv_1"}}
    ).encode()


async def _post_webhook(app: Any, body: bytes, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
        return await client.post("/webhooks/lago", content=body, headers=headers)


# ------------------------------------------------------------------------------------------------- billing routes


def _decoding_authorize(request: Request, org_id: str) -> bool:
    """An app's rule, as written every day: decode the caller's bearer JWT (here expired: PyJWT raises)."""
    token = request.headers["authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])
    return bool(claims.get("admin"))


def _decoding_plans(request: Request, org_id: str, plan_code: str) -> bool:
    token = request.headers["authorization"].removeprefix("Bearer ")
    return bool(jwt.decode(token, JWT_SECRET, algorithms=["HS256"]).get("plans"))


@pytest.mark.parametrize(
    ("callback", "method", "path", "body"),
    [
        ("authorize", "GET", "/organizations/org_a/dashboard", None),
        ("authorize", "GET", "/organizations/org_a/dashboard?format=html", None),
        ("authorize", "GET", "/organizations/org_a/subscription", None),
        ("authorize", "POST", "/organizations/org_a/usage/record", {"tokens": 3}),
        ("plans", "PUT", "/organizations/org_a/subscription", {"plan_code": "pro"}),
    ],
)
def test_a_callback_raising_on_an_expired_jwt_logs_neither_the_token_nor_the_signing_key(
    callback: str, method: str, path: str, body: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``authorize`` (or ``plans``) decoding the caller's JWT, which has expired: the routes deny and log it at ERROR
    with the traceback. That record carried the exception itself, whose frames (the callback's, PyJWT's ``decode``)
    held the bearer token and the app's JWT signing key as locals: an error tracker's event (Sentry's logging
    integration sends ERROR records with their frames' locals) then held the key that forges any user's token."""
    fake = FakeLago(api_key=KEY)
    fake.add_plan("starter", amount_cents=0)
    fake.add_plan("pro", amount_cents=100)
    fake.add_subscription("org_a", "starter", external_id="org_a")
    token = _expired_token()

    async def run() -> list[httpx.Response]:
        settings = BillingSettings(api_url="http://lago.example", api_key=KEY, quota_mode="off", max_retries=0)
        async with LagoClient(settings, transport=fake.transport()) as client:
            routes = (
                billing_routes(authorize=_decoding_authorize, client=client)
                if callback == "authorize"
                else billing_routes(authorize=lambda request, org_id: True, plans=_decoding_plans, client=client)
            )
            app = Starlette(routes=[Mount("/billing", routes)])
            headers = {"Authorization": f"Bearer {token}", "Cookie": f"session={COOKIE_VALUE}"}
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
                return [await http.request(method, "/billing" + path, json=body, headers=headers) for _ in range(2)]

    with caplog.at_level(logging.DEBUG):
        answers = asyncio.run(run())
    assert [answer.status_code for answer in answers] == ([403] * 2 if callback == "authorize" else [422] * 2)
    for answer in answers:
        assert not [secret for secret in (*SECRETS, token) if secret in answer.text]
    assert _log_leaks(caplog, token, JWT_SECRET, COOKIE_VALUE, KEY) == []
    logged = _logged(caplog)  # what failed, and where, is still said to the operator
    assert "ExpiredSignatureError" in logged
    assert f"_decoding_{callback}" in logged


@pytest.mark.parametrize("fault", ["401", "500", "garbage", "down"])
@pytest.mark.parametrize("path", ["/dashboard", "/dashboard?format=html", "/subscription", "/invoices"])
def test_lago_failing_behind_the_routes_shows_no_secret(
    fault: str, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Lago refusing the key, failing, answering non-JSON or unreachable: the answers and the server log of the
    routes (and the dashboard, JSON or HTML) never show the key, the Lago URL's password or the caller's token."""
    fake = FakeLago(api_key=KEY if fault != "401" else "another-key")
    fake.add_plan("starter", amount_cents=0)
    fake.add_subscription("org_a", "starter", external_id="org_a")
    if fault == "500":
        fake.inject_fault(500)
    elif fault == "garbage":
        fake.inject_fault(400, body="<html>Bad Request</html>")
    token = _expired_token()

    async def run() -> httpx.Response:
        url = f"http://billing:{URL_PASSWORD}@" + (f"127.0.0.1:{_free_port()}" if fault == "down" else "lago.example")
        settings = BillingSettings(api_url=url, api_key=KEY, quota_mode="off", max_retries=0, retry_backoff=0.001)
        transport = None if fault == "down" else fake.transport()
        async with LagoClient(settings, transport=transport) as client:
            app = Starlette(routes=[Mount("/billing", billing_routes(authorize=lambda r, o: True, client=client))])
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
                headers = {"Authorization": f"Bearer {token}", "Cookie": f"session={COOKIE_VALUE}"}
                return await http.get("/billing/organizations/org_a" + path, headers=headers)

    with caplog.at_level(logging.DEBUG):
        answer = asyncio.run(run())
    assert answer.status_code in (502, 503, 404)
    assert not [secret for secret in (*SECRETS, token) if secret in answer.text + str(answer.headers)]
    assert _log_leaks(caplog, KEY, URL_PASSWORD, token, COOKIE_VALUE) == []


# ------------------------------------------------------------------------------------------------------- webhooks


@pytest.mark.parametrize("redis", ["refuses_auth", "down"])
def test_a_dedupe_redis_that_refuses_auth_or_is_down_keeps_its_password_out_of_the_log(
    redis: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``LAGO_REDIS_URL`` with a password Redis refuses (a rotated secret): each webhook is processed without dedupe
    and the receiver warns, with the exception. Its frames (redis-py's ``on_connect_check_health``) held
    ``auth_args = (user, password)`` as a local: the Redis password in the error tracker's event."""
    port = redis_url.rsplit(":", 1)[1].split("/")[0] if redis == "refuses_auth" else str(_free_port())
    settings = BillingSettings(
        api_key=KEY,
        webhook_hmac_key=HMAC_KEY,
        redis_url=f"redis://billing:{REDIS_PASSWORD}@127.0.0.1:{port}/0",  # (no such user: AUTH refused)
    )

    async def run() -> list[httpx.Response]:
        webhooks = LagoWebhooks(settings)
        body = _webhook_body()
        try:
            return [
                await _post_webhook(
                    webhooks, body, **{"X-Lago-Signature": sign_hmac(body, HMAC_KEY), "X-Lago-Unique-Key": f"k{n}"}
                )
                for n in range(2)
            ]
        finally:
            await webhooks.aclose()

    with caplog.at_level(logging.DEBUG):
        answers = asyncio.run(run())
    assert [answer.status_code for answer in answers] == [200, 200]  # processed without dedupe
    assert _log_leaks(caplog, REDIS_PASSWORD, HMAC_KEY, KEY) == []
    logged = _logged(caplog)
    assert "Webhook dedupe unavailable" in logged
    assert ("AuthenticationError" if redis == "refuses_auth" else "ConnectionError") in logged  # (what failed)


@pytest.mark.parametrize("webhook_type", ["subscription.updated", "plan.updated", "route"])
def test_a_quota_redis_refusing_auth_while_invalidating_keeps_its_password_out_of_the_log(
    webhook_type: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A webhook (or a plan change through the routes) drops the org's quota state in the gate of
    ``OrgBillingMiddleware``, whose Redis refuses AUTH: the webhook is a 500 (Lago retries it), the plan change is
    made, and both are logged with the exception. Its frames (redis-py's) held the Redis password as a local."""
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    fake = FakeLago(api_key=KEY)
    fake.add_plan("starter", amount_cents=0)
    fake.add_plan("pro", amount_cents=100)
    fake.add_subscription("org_a", "starter", external_id="org_a")
    settings = BillingSettings(
        api_url="http://lago.example",
        api_key=KEY,
        org_header="X-Org-Id",
        webhook_hmac_key=HMAC_KEY,
        redis_url=f"redis://billing:{REDIS_PASSWORD}@127.0.0.1:{port}/0",  # (no such user: AUTH refused)
        plan_limits={"starter": {"max_api_calls": 100}},
        exclude_paths=("/webhooks/",),
        max_retries=0,
    )

    async def run() -> httpx.Response:
        async with LagoClient(settings, transport=fake.transport()) as client:
            webhooks = LagoWebhooks(settings, dedupe=None)
            routes = billing_routes(authorize=lambda request, org_id: True, client=client)
            app = Starlette(routes=[Route("/webhooks/lago", webhooks, methods=["POST"]), Mount("/billing", routes)])
            app.add_middleware(OrgBillingMiddleware, settings=settings, client=client)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
                if webhook_type == "route":
                    return await http.put(
                        "/billing/organizations/org_a/subscription",
                        json={"plan_code": "pro"},
                        headers={"X-Org-Id": "org_a"},
                    )
                body = json.dumps(
                    {
                        "webhook_type": webhook_type,
                        "object_type": "subscription",
                        "subscription": {"external_id": "org_a"},
                    }
                ).encode()
                return await http.post(
                    "/webhooks/lago", content=body, headers={"X-Lago-Signature": sign_hmac(body, HMAC_KEY)}
                )

    with caplog.at_level(logging.DEBUG):
        answer = asyncio.run(run())
    assert answer.status_code == (200 if webhook_type == "route" else 500)
    assert REDIS_PASSWORD not in answer.text
    assert _log_leaks(caplog, REDIS_PASSWORD, HMAC_KEY, KEY) == []
    assert "AuthenticationError" in _logged(caplog)  # (what failed is still said)


@pytest.mark.parametrize(
    "problem", ["unreadable_url", "no_redis_extra"], ids=["a-url-redis-py-cannot-read", "the-redis-extra-missing"]
)
@pytest.mark.parametrize("configured", ["settings", "environment"])
def test_a_dedupe_redis_that_cannot_be_made_is_a_configuration_error_without_secrets(
    problem: str, configured: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``LAGO_REDIS_URL=redis://default:pw@host:6379/0?socket_timeout=2s`` passes the settings' checks but redis-py
    refuses it: each webhook was a 500 with redis-py's bare ``ValueError`` (not a ``LagoIntegrationError``, naming no
    variable), and its frames held the URL with its password (``url``, ``redis_url``) and, in ``_configure``, the
    HMAC key (``hmac_key``). The redis extra missing: the ``ConfigurationError`` was right, its frames as leaky."""
    redis_url = f"redis://default:{REDIS_PASSWORD}@127.0.0.1:{_free_port()}/0"
    if problem == "unreadable_url":
        redis_url += "?socket_timeout=2s"
    else:
        monkeypatch.setitem(sys.modules, "redis.asyncio", None)  # (import redis.asyncio: ImportError)
    environ = {"LAGO_API_KEY": KEY, "LAGO_WEBHOOK_HMAC_KEY": HMAC_KEY, "LAGO_REDIS_URL": redis_url}
    body = _webhook_body()
    signed = {"X-Lago-Signature": sign_hmac(body, HMAC_KEY)}

    with caplog.at_level(logging.DEBUG):
        if configured == "settings":  # made at once (settings given): the error is raised there
            settings = BillingSettings.from_env(None, environ=environ)
            with pytest.raises(ConfigurationError) as info:
                LagoWebhooks(settings)
        else:  # from the environment, on the first webhook
            for name, value in environ.items():
                monkeypatch.setenv(name, value)
            with pytest.raises(ConfigurationError) as info:
                asyncio.run(_post_webhook(LagoWebhooks(), body, **signed))
    assert info.value.variable == "LAGO_REDIS_URL"
    assert "LAGO_REDIS_URL" in str(info.value) and ("redis" in str(info.value))
    assert _leaks(info.value, REDIS_PASSWORD, HMAC_KEY, KEY) == []
    assert _log_leaks(caplog, REDIS_PASSWORD, HMAC_KEY, KEY) == []


def test_a_redis_url_given_to_the_receiver_that_redis_py_cannot_read_hides_its_password() -> None:
    """``LagoWebhooks(settings, redis_url=...)``: not checked by the settings, so any URL redis-py refuses."""
    settings = BillingSettings(api_key=KEY, webhook_hmac_key=HMAC_KEY)
    for url in (
        f"redis://default:{REDIS_PASSWORD}@127.0.0.1:notaport/0",
        f"redisx://default:{REDIS_PASSWORD}@127.0.0.1:6379/0",
    ):
        with pytest.raises(ConfigurationError) as info:
            LagoWebhooks(settings, redis_url=url)
        assert REDIS_PASSWORD not in str(info.value) and "redis" in str(info.value)
        assert _leaks(info.value, REDIS_PASSWORD, HMAC_KEY, KEY) == []


@pytest.mark.parametrize("quoted", [f'"{HMAC_KEY}"', f"'{HMAC_KEY}'"])
def test_an_hmac_key_given_in_quotes_is_refused_without_showing_it(quoted: str) -> None:
    """``LagoWebhooks(hmac_key=os.environ["LAGO_WEBHOOK_HMAC_KEY"])`` under ``docker run --env-file`` (quotes kept):
    refused, rightly, but every frame the error went through (``_check_unquoted``, ``_given_hmac_key``,
    ``LagoWebhooks.__init__``) held the key as a local."""
    with pytest.raises(ConfigurationError) as info:
        LagoWebhooks(BillingSettings(api_key=KEY), hmac_key=quoted)
    assert info.value.variable == "LAGO_WEBHOOK_HMAC_KEY"
    assert _leaks(info.value, HMAC_KEY, KEY) == []


@pytest.mark.parametrize(
    ("signature", "body", "status"),
    [
        ("bm90IHRoZSBzaWduYXR1cmU=", None, 401),  # a wrong HMAC
        ("", None, 401),  # none
        ("eyJhbGciOiJSUzI1NiJ9.e30.c2ln", None, 401),  # a JWT, HMAC expected
        (None, b'{"webhook_type": 3', 400),  # signed, not JSON
        (None, b'["not", "an", "envelope"]', 400),
        (None, b"\xff\xfe\x00junk", 400),
    ],
)
def test_refused_webhooks_show_no_secret(
    signature: str | None, body: bytes | None, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Bad signatures and malformed bodies: the answers and the log never hold the HMAC key or the API key."""
    payload = body if body is not None else _webhook_body()
    sent = signature if signature is not None else sign_hmac(payload, HMAC_KEY)
    settings = BillingSettings(api_key=KEY, webhook_hmac_key=HMAC_KEY)
    with caplog.at_level(logging.DEBUG):
        answer = asyncio.run(_post_webhook(LagoWebhooks(settings), payload, **{"X-Lago-Signature": sent}))
    assert answer.status_code == status
    assert not [secret for secret in SECRETS if secret in answer.text]
    assert _log_leaks(caplog, HMAC_KEY, KEY) == []


@pytest.mark.parametrize("fault", ["401", "500"])
def test_jwt_mode_with_lago_refusing_the_key_or_failing_shows_no_secret(
    fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    """JWT mode: Lago's public key cannot be fetched (the key refused, Lago failing): 503, and the log says why
    without the API key or the Lago URL's password."""
    fake = FakeLago(api_key=KEY if fault != "401" else "another-key")
    if fault == "500":
        fake.inject_fault(500)
    body = _webhook_body()
    token = jwt.encode({"data": body.decode(), "iss": "http://lago.example"}, fake.rsa_private_key_pem, "RS256")

    async def run() -> httpx.Response:
        settings = BillingSettings(
            api_url=f"http://billing:{URL_PASSWORD}@lago.example", api_key=KEY, max_retries=0, organization_id="o"
        )
        async with LagoClient(settings, transport=fake.transport()) as client:
            return await _post_webhook(LagoWebhooks(settings, client=client), body, **{"X-Lago-Signature": token})

    with caplog.at_level(logging.DEBUG):
        answer = asyncio.run(run())
    assert answer.status_code == 503
    assert not [secret for secret in SECRETS if secret in answer.text]
    assert _log_leaks(caplog, KEY, URL_PASSWORD) == []


# ---------------------------------------------------------------------------------------------------- commands


@pytest.fixture
def mapping(tmp_path: Path) -> Path:
    path = tmp_path / "mapping.csv"
    path.write_text("user_id,org_id,org_name,email\nu1,org_1,Org One,a@example.com\n", encoding="utf-8")
    return path


@pytest.fixture
def secret_environment(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every LAGO_* secret set, as in a deployment's environment; returns a function pointing it at a Lago."""

    def point_at(lago_url: str) -> None:
        host = lago_url.split("://", 1)[1]
        monkeypatch.setenv("LAGO_API_URL", f"http://billing:{URL_PASSWORD}@{host}")
        monkeypatch.setenv("LAGO_API_KEY", KEY)
        monkeypatch.setenv("LAGO_WEBHOOK_HMAC_KEY", HMAC_KEY)
        monkeypatch.setenv("LAGO_REDIS_URL", f"redis://default:{REDIS_PASSWORD}@127.0.0.1:6379/0")
        monkeypatch.setenv("LAGO_MAX_RETRIES", "0")
        monkeypatch.setenv("LAGO_RETRY_BACKOFF", "0.001")

    return point_at


@pytest.mark.parametrize("fault", ["401", "500", "bad_setting"])
@pytest.mark.parametrize(
    "command",
    [
        ["migrate", "--mapping-file", "{mapping}", "--execute", "--report", "{report}"],
        ["migrate", "--mapping-file", "{mapping}", "--verify"],
        ["migrate", "--mapping-file", "{mapping}"],
        ["health"],
        ["health", "--json"],
        ["dead-letters", "--spool", "{spool}", "--replay", "--json"],
    ],
    ids=["migrate-execute", "migrate-verify", "migrate-dry-run", "health", "health-json", "dead-letters-json"],
)
def test_commands_failing_show_no_secret(
    fault: str,
    command: list[str],
    fake_lago_server: FakeLago,
    secret_environment: Any,
    mapping: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The commands, verbose (``-v``: every HTTP request logged), with Lago refusing the key, failing, or a setting
    refused: stdout, stderr, the log and the JSON report hold no secret of the environment."""
    fake_lago_server.api_key = KEY if fault != "401" else "another-key"
    if fault == "500":
        fake_lago_server.inject_fault(500)
    secret_environment(str(fake_lago_server.url))
    if fault == "bad_setting":
        monkeypatch.setenv("LAGO_FAIL_OPEN", "maybe")
    report = tmp_path / "report.json"
    argv = [part.format(mapping=mapping, report=report, spool=tmp_path / "spool.db") for part in command]
    with caplog.at_level(logging.DEBUG):
        code = main(["-v", *argv])
    captured = capsys.readouterr()
    assert code != 0
    shown = captured.out + captured.err + _logged(caplog) + (report.read_text() if report.exists() else "")
    assert not [secret for secret in SECRETS if secret in shown]
    assert _log_leaks(caplog, *SECRETS) == []
    if "--json" in argv:
        assert "error" in json.loads(captured.out) or json.loads(captured.out).get("healthy") is False


def test_the_emulator_and_demo_commands_failing_show_no_secret_of_the_environment(
    secret_environment: Any, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """``emulator`` and ``demo`` on a port in use: the key of the environment (a real Lago's) is not printed."""
    secret_environment("http://127.0.0.1:3000")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        with caplog.at_level(logging.DEBUG):
            codes = [main(["emulator", "--port", port]), main(["demo", "--port", port])]
    captured = capsys.readouterr()
    assert all(code != 0 for code in codes)
    shown = captured.out + captured.err + _logged(caplog)
    assert not [secret for secret in SECRETS if secret in shown]


# --------------------------------------------------------------------------------------- identity resolvers


def test_an_org_resolver_raising_on_an_expired_jwt_logs_neither_the_token_nor_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = _expired_token()

    def resolve_org(scope: Any) -> str | None:
        headers = dict(scope["headers"])
        claims = jwt.decode(headers[b"authorization"].decode()[7:], JWT_SECRET, algorithms=["HS256"])
        return str(claims["org"])

    async def ok(request: Request) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({})

    fake = FakeLago(api_key=KEY)
    settings = BillingSettings(api_url="http://lago.example", api_key=KEY, quota_mode="off")
    app = Starlette(routes=[Route("/x", ok)])
    app.add_middleware(OrgBillingMiddleware, settings=settings, resolve_org=resolve_org, transport=fake.transport())

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            await http.get("/x", headers={"Authorization": f"Bearer {token}"})

    with caplog.at_level(logging.DEBUG):
        anyio.run(run)
    assert "resolve_org" in _logged(caplog)
    assert _log_leaks(caplog, token, JWT_SECRET) == []
