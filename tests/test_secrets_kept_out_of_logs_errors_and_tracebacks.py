"""Review (angle: secrets never leak): the API key, passwords of Lago, Redis and proxy URLs, never in logs (DEBUG
included), exception messages, reprs, cause/context chains, nor in the locals of the tracebacks an operator ships
(Sentry's ``include_local_variables`` is on by default; loguru's ``diagnose``, ``rich`` tracebacks show them too).

Failures are real: a socket on 127.0.0.1 that closes each connection or refuses it, the emulator answering 401/500 and
non-JSON, proxy variables pointing at a closed port or malformed, settings given values they refuse.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from lago_org_billing import BillingSettings, ConfigurationError, LagoClient, LagoIntegrationError
from lago_org_billing._settings import masked_url, redact_url
from lago_org_billing.testing import FakeLago

KEY = "sk_live_REVIEWSECRET_7f3a9c"
URL_PASSWORD = "UrlPa55word"
PROXY_PASSWORD = "Pr0xyPa55"
HMAC_KEY = "whsec_REVIEWHMAC_91b2"
REDIS_PASSWORD = "R3disPa55"


# ----------------------------------------------------------------------------------------------------------- helpers


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception reachable from it by ``__cause__`` and ``__context__`` (suppressed ones too)."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or any(current is known for known in seen):
            continue
        seen.append(current)
        todo += [current.__cause__, current.__context__]
    return seen


def _shown(value: object) -> str:
    try:
        return repr(value)
    except Exception as exc:  # (a half-made object of a library's): its repr is not what is looked at
        return f"<repr failed: {exc!r}>"


def _texts(exc: BaseException, own: str = __file__) -> Iterator[tuple[str, str]]:
    """What an operator's tooling may ship of ``exc``: str, repr and attributes of each exception of its chain, and
    the repr of every local of every frame of their tracebacks (as Sentry and ``capture_locals`` show them), but the
    frames of the test file ``own``."""
    for error in _chain(exc):
        name = type(error).__name__
        yield f"str({name})", str(error)
        yield f"repr({name})", _shown(error)
        yield f"vars({name})", _shown(getattr(error, "__dict__", {}))
        tb = error.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code.co_filename == own:  # (the test's own frames hold the secrets it passed)
                tb = tb.tb_next
                continue
            for local, value in list(frame.f_locals.items()):
                yield f"{name} traceback: {frame.f_code.co_name}() local {local}", _shown(value)
            tb = tb.tb_next


def _leaks(exc: BaseException, *secrets: str, own: str = __file__) -> list[str]:
    return [f"{where}: {text[:160]}" for where, text in _texts(exc, own) for secret in secrets if secret in text]


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every record as a handler would write it: message, arguments and formatted traceback."""
    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
    return "\n".join(formatter.format(record) for record in caplog.records)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def closing_server() -> Iterator[int]:
    """A server on 127.0.0.1 that reads each request and closes the connection without answering (a Lago restarting,
    a load balancer dropping it)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1])
    stop.set()
    socket.create_connection(listener.getsockname(), timeout=5).close()  # (wakes the accept() up)
    listener.close()
    thread.join(timeout=5)


@pytest.fixture
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def _settings(url: str, **overrides: Any) -> BillingSettings:
    return BillingSettings(api_url=url, api_key=KEY, max_retries=0, retry_backoff=0.001, **overrides)


# ------------------------------------------------------------------------------------------ the event batch's poster


@pytest.mark.parametrize("server", ["closes", "refuses"])
def test_a_failed_event_batch_keeps_the_api_key_out_of_its_traceback(
    server: str, closing_server: int, no_proxies: None
) -> None:
    """The hot call (``POST /events/batch`` through the raw poster) failing on a connection Lago closes or refuses:
    the request it wrote, ``Authorization: Bearer <key>`` included, was a local of the frames in the error's chain."""
    port = closing_server if server == "closes" else _free_port()

    async def main() -> BaseException:
        async with LagoClient(_settings(f"http://127.0.0.1:{port}")) as client:
            assert client._raw is not None  # (the raw poster's path: no transport, no proxy)
            with pytest.raises(LagoIntegrationError) as info:
                await client.send_event_batch_json(b'{"events": []}')
            return info.value

    error = asyncio.run(main())
    assert _leaks(error, KEY) == []


# --------------------------------------------------------------------------------------- a Lago URL with user:pass@


def test_a_lago_url_with_credentials_never_shows_its_password_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    """``LAGO_API_URL=https://user:pass@lago...`` (the client warns that the part is not sent): httpx's own INFO line
    of each request logged the URL with the password, unmasked."""
    fake = FakeLago(api_key=KEY)
    fake.add_plan("starter", amount_cents=0)
    fake.add_subscription("org_a", "starter", external_id="org_a")

    async def main() -> None:
        settings = _settings(f"https://billing:{URL_PASSWORD}@lago.example")
        async with LagoClient(settings, transport=fake.transport()) as client:
            await client.get_customer("org_a")
            with pytest.raises(LagoIntegrationError) as info:
                await client.get_customer("org_missing")
            assert _leaks(info.value, URL_PASSWORD, KEY) == []

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert "lago.example" in _logged(caplog)  # (the warning about the user:password@ part)
    assert URL_PASSWORD not in _logged(caplog)
    assert KEY not in _logged(caplog)


def test_a_lago_url_with_credentials_stays_out_of_a_network_errors_chain(
    caplog: pytest.LogCaptureFixture, no_proxies: None
) -> None:
    """Lago unreachable: the httpx error under the ``LagoUnavailableError`` carried its request, whose repr shows the
    URL with the password."""
    port = _free_port()

    async def main() -> None:
        async with LagoClient(_settings(f"http://billing:{URL_PASSWORD}@127.0.0.1:{port}")) as client:
            for call in (lambda: client.get_customer("org_a"), lambda: client.send_event_batch_json(b"{}")):
                with pytest.raises(LagoIntegrationError) as info:
                    await call()
                assert _leaks(info.value, URL_PASSWORD, KEY) == []

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert URL_PASSWORD not in _logged(caplog)


# ------------------------------------------------------------------------------------------- proxies with u:p@


def test_a_proxy_with_credentials_stays_out_of_a_network_errors_chain(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``HTTPS_PROXY=http://u:p@proxy`` down: httpcore's frames in the chain held the request's headers, the proxy's
    ``Proxy-Authorization`` and the API key's ``Authorization`` among them."""
    proxy = f"http://squid:{PROXY_PASSWORD}@127.0.0.1:{_free_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    basic = base64.b64encode(f"squid:{PROXY_PASSWORD}".encode()).decode()

    async def main() -> None:
        async with LagoClient(_settings("http://lago.example")) as client:
            assert client._raw is None  # (through httpx and its proxy)
            for call in (lambda: client.get_customer("org_a"), lambda: client.send_event_batch_json(b"{}")):
                with pytest.raises(LagoIntegrationError) as info:
                    await call()
                assert _leaks(info.value, KEY, PROXY_PASSWORD, basic) == []

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert PROXY_PASSWORD not in _logged(caplog)
    assert KEY not in _logged(caplog)


def test_a_malformed_proxy_variable_is_a_configuration_error_that_hides_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``HTTPS_PROXY`` that httpx cannot read: httpx's own ``InvalidURL`` escaped ``LagoClient(...)`` (not a
    ``LagoIntegrationError``), with the proxy URL and the API key in its traceback's locals."""
    monkeypatch.setenv("HTTPS_PROXY", f"http://squid:{PROXY_PASSWORD}@proxy.internal:31x8")
    monkeypatch.delenv("https_proxy", raising=False)
    with pytest.raises(ConfigurationError) as info:
        LagoClient(_settings("https://lago.example"))
    assert "HTTPS_PROXY" in str(info.value)
    assert _leaks(info.value, KEY, PROXY_PASSWORD) == []


def test_a_client_that_cannot_be_made_keeps_the_api_key_out_of_its_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """``SSL_CERT_FILE`` naming no file: the ``ConfigurationError`` is right, but ``LagoClient.__init__``'s frame held
    the key and the ``Authorization`` header as locals."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "gone.pem"))
    with pytest.raises(ConfigurationError) as info:
        LagoClient(_settings("https://lago.example"))
    assert _leaks(info.value, KEY) == []


# -------------------------------------------------------------------------------- Lago's refusals, as they come


@pytest.mark.parametrize("fault", ["401", "500", "garbage"])
def test_lago_refusing_or_failing_never_shows_the_key(fault: str, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeLago(api_key=KEY if fault != "401" else "another-key")
    fake.add_plan("starter", amount_cents=0)
    fake.add_subscription("org_a", "starter", external_id="org_a")
    if fault == "500":
        fake.inject_fault(500, path="/api/v1/customers")
    elif fault == "garbage":
        fake.inject_fault(400, path="/api/v1/customers", body="<html>Bad Request</html>")

    async def main() -> None:
        settings = _settings("http://lago.example").replace(max_retries=1)
        async with LagoClient(settings, transport=fake.transport()) as client:
            with pytest.raises(LagoIntegrationError) as info:
                await client.get_customer("org_a")
            assert _leaks(info.value, KEY) == []

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert KEY not in _logged(caplog)


# ----------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("field", "value", "password"),
    [
        ("redis_url", f"redis://default:{REDIS_PASSWORD}/x@127.0.0.1:6379/0", REDIS_PASSWORD),  # '/' in it
        ("redis_url", f"redis://default:{REDIS_PASSWORD}#1@127.0.0.1:6379/0", REDIS_PASSWORD),  # '#' in it
        ("redis_url", f"redis:/default:{REDIS_PASSWORD}@127.0.0.1:6379/0", REDIS_PASSWORD),  # a slash short
        ("redis_url", f"redis//default:{REDIS_PASSWORD}@127.0.0.1:6379", REDIS_PASSWORD),  # no colon
        ("api_url", f"https://billing:{URL_PASSWORD}?z@lago.example", URL_PASSWORD),  # '?' in it
        ("api_url", f"https://billing:{URL_PASSWORD}/z@lago.example", URL_PASSWORD),
    ],
)
def test_a_refused_url_never_shows_its_password(field: str, value: str, password: str) -> None:
    """A URL whose password holds a character that ends the URL's authority unescaped (``/``, ``?``, ``#``) or that
    lacks a slash: refused, and the message showed the password, as ``masked_url`` found no ``@`` in the host part."""
    with pytest.raises(ConfigurationError) as info:
        BillingSettings(api_key=KEY, **{field: value})
    assert _leaks(info.value, password, KEY) == []
    assert password not in masked_url(value)
    assert password not in redact_url(value)


def test_urls_without_credentials_are_shown_as_written() -> None:
    for url in ("redis://127.0.0.1:6379/0", "unix:///run/redis.sock?db=0", "https://lago.example/base"):
        assert masked_url(url) == url
    assert masked_url(f"redis://default:{REDIS_PASSWORD}@h:6379/0") == "redis://default:***@h:6379/0"
    assert masked_url(f"redis://:{REDIS_PASSWORD}@h:6379") == "redis://:***@h:6379"


def test_settings_repr_and_str_hide_every_secret() -> None:
    settings = BillingSettings(
        api_url=f"https://billing:{URL_PASSWORD}@lago.example",
        api_key=KEY,
        webhook_hmac_key=HMAC_KEY,
        redis_url=f"redis://default:{REDIS_PASSWORD}@127.0.0.1:6379/0",
    )
    for text in (repr(settings), str(settings), f"{settings!r}"):
        for secret in (KEY, HMAC_KEY, URL_PASSWORD, REDIS_PASSWORD):
            assert secret not in text


def test_the_objects_of_the_package_hide_every_secret_in_their_repr() -> None:
    from lago_org_billing import EventPipeline, LagoWebhooks, OrgBilling, OrgBillingMiddleware

    fake = FakeLago(api_key=KEY)
    settings = BillingSettings(
        api_url=f"https://billing:{URL_PASSWORD}@lago.example",
        api_key=KEY,
        webhook_hmac_key=HMAC_KEY,
        quota_mode="off",
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover (never called)
        raise AssertionError

    async def main() -> list[object]:
        client = LagoClient(settings, transport=fake.transport())
        objects: list[object] = [
            settings,
            client,
            client._raw,
            client._http,
            OrgBilling(settings, client=client),
            OrgBillingMiddleware(app, settings=settings),
            EventPipeline(client),
            LagoWebhooks(settings, client=client),
        ]
        await client.aclose()
        return objects

    for thing in asyncio.run(main()):
        for text in (repr(thing), str(thing)):
            for secret in (KEY, HMAC_KEY, URL_PASSWORD):
                assert secret not in text, (type(thing).__name__, text)


def test_the_delivery_path_logs_and_metrics_never_show_the_key(caplog: pytest.LogCaptureFixture) -> None:
    """The pipeline delivering through Lago refusing the key (401) then failing (500): its logs (DEBUG included) and
    the Prometheus exposition of its metrics (``lago_errors_total`` by status)."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from lago_org_billing import EventPipeline, PipelineMetrics

    fake = FakeLago(api_key=KEY)
    fake.add_plan("starter", amount_cents=0)
    fake.add_subscription("org_a", "starter", external_id="org_a")
    fake.inject_fault(401, count=2, path="/api/v1/events")
    fake.inject_fault(500, count=2, path="/api/v1/events")
    registry = prometheus_client.CollectorRegistry()

    async def main() -> None:
        metrics = PipelineMetrics()
        metrics.register(registry)
        async with LagoClient(_settings("http://lago.example"), transport=fake.transport()) as client:
            pipeline = EventPipeline(
                client, metrics=metrics, flush_interval=0.001, retry_backoff=0.001, max_backoff=0.01
            )
            async with anyio.create_task_group() as tg:
                await tg.start(pipeline.run)
                pipeline.submit({"transaction_id": "t1", "external_subscription_id": "org_a", "code": "api_call"})
                assert await pipeline.flush(20)
                await pipeline.aclose()
        assert metrics.lago_errors  # (the 401 was seen)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert KEY not in _logged(caplog)
    assert KEY not in prometheus_client.generate_latest(registry).decode()


def test_a_client_error_after_the_fix_still_says_what_failed(no_proxies: None) -> None:
    """The chain kept for debugging: the cause is still httpx's error of that kind, and the message names it."""
    port = _free_port()

    async def main() -> BaseException:
        async with LagoClient(_settings(f"http://127.0.0.1:{port}")) as client:
            with pytest.raises(LagoIntegrationError) as info:
                await client.get_customer("org_a")
            return info.value

    error = asyncio.run(main())
    assert isinstance(error.__cause__, httpx.ConnectError)
    assert "ConnectError" in str(error)


def test_settings_refused_from_the_environment_keep_secrets_out_of_the_traceback(tmp_path: Any) -> None:
    """``from_env`` refusing a value: the frames the error went through had the whole environment, the ``.env``
    file's values and the parsed fields as locals (``source``, ``file_values``, ``values``): every secret of the
    deployment in the Sentry event of a crash at startup."""
    environ = {
        "LAGO_API_KEY": KEY,
        "LAGO_WEBHOOK_HMAC_KEY": HMAC_KEY,
        "LAGO_REDIS_URL": f"redis://default:{REDIS_PASSWORD}@127.0.0.1:6379/0",
        "LAGO_API_URL": f"https://billing:{URL_PASSWORD}@lago.example",
    }
    for name, value in (("LAGO_FAIL_OPEN", "maybe"), ("LAGO_SUBSCRIPTION_ID_TEMPLATE", "sub_{org}")):
        with pytest.raises(ConfigurationError) as info:
            BillingSettings.from_env(None, environ={**environ, name: value})
        assert info.value.variable == name
        assert _leaks(info.value, KEY, HMAC_KEY, REDIS_PASSWORD, URL_PASSWORD) == []
    env_file = tmp_path / ".env"
    env_file.write_bytes(f"LAGO_API_KEY={KEY}\nLAGO_WEBHOOK_HMAC_KEY={HMAC_KEY}\nLAGO_X=\xff\n".encode("latin-1"))
    with pytest.raises(ConfigurationError) as info:
        BillingSettings.from_env(env_file, environ={})
    assert _leaks(info.value, KEY, HMAC_KEY) == []


def test_settings_refused_in_code_keep_secrets_out_of_the_traceback() -> None:
    """``BillingSettings(...)`` refusing a field: the dataclass' ``__init__`` frame had every field as a local."""
    with pytest.raises(ConfigurationError) as info:
        BillingSettings(
            api_key=KEY,
            webhook_hmac_key=HMAC_KEY,
            redis_url=f"redis://default:{REDIS_PASSWORD}@127.0.0.1:6379/0",
            exclude_paths=("health",),
        )
    assert info.value.variable == "LAGO_EXCLUDE_PATHS"
    assert _leaks(info.value, KEY, HMAC_KEY, REDIS_PASSWORD) == []
    # the dataclass' signature is kept (editors, inspect), and replace() still checks
    import inspect

    assert "api_key" in inspect.signature(BillingSettings).parameters
    with pytest.raises(ConfigurationError):
        BillingSettings(api_key=KEY).replace(max_retries=-1)


def test_the_redis_quota_store_shows_its_url_without_the_password() -> None:
    """``RedisBackend.url`` (a public attribute: ``vars()``, debuggers and error trackers' locals show it) held the
    URL with its password; it is the masked URL, the pool keeping the real one."""
    pytest.importorskip("redis")
    from lago_org_billing._quota_redis import RedisBackend

    backend = RedisBackend("redis://billing:s3cr3t-pw@127.0.0.1:1/0")
    assert "s3cr3t-pw" not in backend.url
    assert backend.url == "redis://billing:***@127.0.0.1:1/0"
