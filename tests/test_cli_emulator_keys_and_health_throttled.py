"""Found by an audit of the CLI:

- ``health`` promises one attempt of each call within ``LAGO_API_TIMEOUT``, but a 429 was retried after the wait Lago
  asked for (up to ``LAGO_RETRY_DEADLINE``): a readiness probe hung 25 s, or said "healthy" after a retry. A read made
  with ``retry=False`` (a probe's) is not resent after a 429 either.
- ``emulator`` printed ``export ... LAGO_API_KEY=<key>`` unquoted: a key with a ``$``, ``;`` or quote, pasted, set
  another key (every call a 401) or was a shell syntax error. It is quoted for a shell.
- ``emulator`` served with a key no client can send (``dev key``: every call a 401; ``Bearer x``): exit 2, said.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from pytest_httpx import HTTPXMock

from lago_org_billing import BillingSettings, LagoClient, LagoRateLimitError, OrgBilling
from lago_org_billing.cli import main

URL = "http://127.0.0.1:3999"
THROTTLED = {"status": 429, "error": "Too Many Requests", "code": "too_many_requests"}


@pytest.mark.anyio
async def test_the_health_probe_does_not_retry_a_429(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{URL}/health", json={"message": "Success", "version": "1.30.0"})
    httpx_mock.add_response(
        url=f"{URL}/api/v1/customers?page=1&per_page=1", status_code=429, headers={"Retry-After": "3"}, json=THROTTLED
    )
    settings = BillingSettings(api_key="key", api_url=URL, api_timeout=1.0, retry_deadline=30.0)
    async with OrgBilling(settings) as billing:
        result = await billing.check_lago_health()
    assert result["healthy"] is False and "429" in str(result), result
    assert len(httpx_mock.get_requests()) == 2  # /health once, /api/v1/customers once (it was 5: retried)


@pytest.mark.anyio
async def test_a_read_with_retry_false_is_not_resent_after_a_429_but_other_reads_are(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{URL}/health", status_code=429, headers={"Retry-After": "0"}, json=THROTTLED)
    settings = BillingSettings(api_key="key", api_url=URL, retry_backoff=0.001)
    async with LagoClient(settings) as lago:
        with pytest.raises(LagoRateLimitError):
            await lago.health(retry=False)
        assert len(httpx_mock.get_requests()) == 1
        httpx_mock.add_response(url=f"{URL}/health", status_code=429, headers={"Retry-After": "0"}, json=THROTTLED)
        httpx_mock.add_response(url=f"{URL}/health", json={"message": "Success", "version": "1.30.0"})
        assert (await lago.health())["message"] == "Success"  # (the default: retried after the wait)
    assert len(httpx_mock.get_requests()) == 3


def _emulator(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    from lago_org_billing.testing import _server

    monkeypatch.setattr(_server, "run", lambda *args, **kwargs: None)  # (printed, never served)
    monkeypatch.delenv("LAGO_API_KEY", raising=False)
    return main(["emulator", "--port", "0", *argv])


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash to paste the printed line into")
@pytest.mark.parametrize("key", ["dev$1key", "dev;key", "dev'key", 'd"e`v', "plain-key_1"])
def test_the_printed_export_line_sets_the_key_when_pasted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    assert _emulator(monkeypatch, "--api-key", key) == 0
    line = next(text.strip() for text in capsys.readouterr().out.splitlines() if text.strip().startswith("export "))
    pasted = subprocess.run(
        ["bash", "-c", f'{line}\nprintf "%s|%s" "$LAGO_API_KEY" "$LAGO_API_URL"'],
        capture_output=True,
        text=True,
        timeout=30,
    )
    got_key, got_url = pasted.stdout.split("|")
    assert got_key == key, f"pasting {line!r} set LAGO_API_KEY={got_key!r}"
    assert got_url.startswith("http://127.0.0.1:")


@pytest.mark.parametrize("key", ["dev key", "Bearer abc", "k\u2019ey", "   "])
def test_an_emulator_key_no_client_can_send_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    assert _emulator(monkeypatch, "--api-key", key) == 2
    captured = capsys.readouterr()
    assert "error: The emulator's API key (--api-key)" in captured.err and "export" not in captured.out, captured
