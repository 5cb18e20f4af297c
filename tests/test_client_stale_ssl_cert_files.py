"""A ``SSL_CERT_FILE`` naming a file that no longer exists (a removed corporate CA bundle, an old virtualenv's):
a client of an http Lago never checks a certificate and is not broken by it; one of an https Lago says what is
wrong with which variable, instead of httpx's bare ``FileNotFoundError`` out of ``LagoClient(...)``."""

from __future__ import annotations

import pytest

from lago_org_billing import BillingSettings, ConfigurationError, LagoClient
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


async def test_an_http_lago_is_reached_whatever_ssl_cert_file_says(
    monkeypatch: pytest.MonkeyPatch, fake_lago_server: FakeLago
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent/ca-bundle.pem")
    async with LagoClient(BillingSettings(api_url=fake_lago_server.url, api_key=fake_lago_server.api_key)) as client:
        assert (await client.health())["message"] == "Success"


def test_an_https_lago_with_a_missing_ssl_cert_file_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent/ca-bundle.pem")
    missing = r"SSL_CERT_FILE names '/nonexistent/ca-bundle\.pem', which is no file"
    with pytest.raises(ConfigurationError, match=missing):
        LagoClient(BillingSettings(api_url="https://lago.example.test", api_key="key"))
    monkeypatch.delenv("SSL_CERT_FILE")
    LagoClient(BillingSettings(api_url="https://lago.example.test", api_key="key"))  # (certifi's bundle)
