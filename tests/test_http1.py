"""The raw HTTP/1.1 path LagoClient uses for event batches, against real servers on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lago_org_billing import (
    BillingSettings,
    LagoAPIError,
    LagoClient,
    LagoNotFoundError,
    LagoUnavailableError,
    LagoValidationError,
)
from lago_org_billing._http1 import RawHTTPError, RawPoster, can_use_raw_poster
from lago_org_billing.testing._server import serve_in_thread

pytestmark = pytest.mark.anyio


def batch(*ids: str) -> bytes:
    events = [
        {"transaction_id": i, "external_subscription_id": "org_1", "code": "api_call", "timestamp": "1767225600.000"}
        for i in ids
    ]
    return json.dumps({"events": events}).encode()


async def test_client_uses_raw_path_and_reuses_the_connection(fake_lago_server: Any) -> None:
    """Batches go over one kept-alive connection and land in Lago."""
    settings = BillingSettings(api_url=fake_lago_server.url, api_key=fake_lago_server.api_key)
    async with LagoClient(settings) as lago:
        assert lago._raw is not None
        for n in range(3):
            await lago.send_event_batch_json(batch(f"tx_{n}a", f"tx_{n}b"))
        assert len(lago._raw._idle) == 1
    assert len(fake_lago_server.events) == 6


async def test_raw_path_maps_lago_errors(fake_lago_server: Any) -> None:
    """A 422 from Lago is the same LagoValidationError as through httpx."""
    settings = BillingSettings(api_url=fake_lago_server.url, api_key=fake_lago_server.api_key)
    async with LagoClient(settings) as lago:
        await lago.send_event_batch_json(batch("tx_1"))
        with pytest.raises(LagoValidationError) as info:
            await lago.send_event_batch_json(batch("tx_1"))
    assert info.value.is_duplicate_only


async def test_dropped_connection_is_unavailable(fake_lago_server: Any) -> None:
    """A server that closes without answering is a LagoUnavailableError; the next call works."""
    settings = BillingSettings(api_url=fake_lago_server.url, api_key=fake_lago_server.api_key)
    async with LagoClient(settings) as lago:
        fake_lago_server.inject_fault(drop=True, count=1, path="/api/v1/events")
        with pytest.raises(LagoUnavailableError):
            await lago.send_event_batch_json(batch("tx_1"))
        await lago.send_event_batch_json(batch("tx_2"))
    assert [e["transaction_id"] for e in fake_lago_server.events] == ["tx_2"]


async def test_stale_pooled_connection_is_retried_once() -> None:
    """A kept-alive connection the server closed meanwhile is replaced transparently."""
    answers = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal answers
        if scope["type"] != "http":
            return
        answers += 1
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    with serve_in_thread(app) as url:
        poster = RawPoster(url, {}, timeout=5)
        assert (await poster.post("/x", b"{}"))[0] == 200
        # Break the pooled connection under the poster's feet, as a server idle timeout would.
        await poster._idle[0].stream.aclose()
        assert (await poster.post("/x", b"{}"))[0] == 200
        await poster.aclose()
    assert answers == 2


async def test_chunked_and_close_delimited_answers() -> None:
    """Chunked bodies (with several chunks) and bodies ended by closing are read whole."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 201, "headers": [(b"x-kind", b"chunked")]})
        for part in (b'{"a":', b"1", b"}"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    with serve_in_thread(app) as url:
        poster = RawPoster(url, {"Authorization": "Bearer k"}, timeout=5)
        status, headers, body = await poster.post("/x", b"{}")
        await poster.aclose()
    assert status == 201 and body == b'{"a":1}'
    assert ("x-kind", "chunked") in [(k.lower(), v) for k, v in headers]


async def test_timeout_and_refused_connection() -> None:
    """No answer in time, or nobody listening: RawHTTPError, never a hang."""

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":  # never answers; returns once the client hangs up
            while (await receive())["type"] != "http.disconnect":
                pass

    with serve_in_thread(slow) as url:
        poster = RawPoster(url, {}, timeout=0.2)
        with pytest.raises(RawHTTPError, match="no answer"):
            await poster.post("/x", b"{}")
    poster = RawPoster("http://127.0.0.1:9", {}, timeout=2)
    with pytest.raises(RawHTTPError):
        await poster.post("/x", b"{}")


def test_raw_path_only_without_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy in the environment sends everything through httpx, which knows proxies."""
    assert can_use_raw_poster("https://api.getlago.com")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert not can_use_raw_poster("https://api.getlago.com")


async def test_https_with_certificate_verification(
    tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over TLS the certificate is verified (SSL_CERT_FILE trusted, otherwise refused)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    cert_file, key_file = tls_files
    with serve_in_thread(app, ssl_certfile=str(cert_file), ssl_keyfile=str(key_file)) as url:
        assert url.startswith("https://")
        untrusted = RawPoster(url, {}, timeout=5)
        with pytest.raises(RawHTTPError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
            await untrusted.post("/x", b"{}")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
        trusted = RawPoster(url, {}, timeout=5)
        assert (await trusted.post("/x", b"{}"))[2] == b"ok"
        await trusted.aclose()


async def serve_raw(answer: bytes, task_status: Any) -> None:
    """A TCP server on loopback answering every request with the bytes ``answer`` (then the connection is closed)."""
    import anyio

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")

    async def handle(stream: Any) -> None:
        async with stream:
            received = b""
            while b"\r\n\r\n" not in received:
                received += await stream.receive()
            head, _, body = received.partition(b"\r\n\r\n")
            length = int(
                next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            )
            while len(body) < length:
                body += await stream.receive()
            await stream.send(answer)

    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(handle)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", None),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 422 Unprocessable Entity\r\nContent-Type: application/json\r\n"
            b'Content-Length: 74\r\n\r\n{"status":422,"error":"x","code":"validation_errors","error_details":{}}   ',
            LagoValidationError,
        ),
        (
            b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://lago.example/\r\nContent-Length: 0\r\n\r\n",
            LagoAPIError,
        ),
    ],
)
async def test_interim_answers_are_skipped_and_a_redirect_is_not_delivery(answer: bytes, error: Any) -> None:
    """An interim 100 Continue is not the answer (the real one after it is); a 301 is an error naming the
    redirect, never a delivered batch."""
    import anyio

    async with anyio.create_task_group() as tasks:
        port = await tasks.start(serve_raw, answer)
        settings = BillingSettings(api_url=f"http://127.0.0.1:{port}", api_key="k", max_retries=0)
        async with LagoClient(settings) as lago:
            assert lago._raw is not None
            if error is None:
                await lago.send_event_batch_json(batch("tx_1"))
            else:
                with pytest.raises(error) as info:
                    await lago.send_event_batch_json(batch("tx_1"))
                if error is LagoAPIError:
                    assert "redirected to https://lago.example/" in str(info.value)
                    assert not isinstance(info.value, LagoNotFoundError)  # not "the org has none"
        tasks.cancel_scope.cancel()
