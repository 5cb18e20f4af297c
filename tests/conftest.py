from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio."""
    return "asyncio"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway redis-server on 127.0.0.1 for the module (skipped when not installed; .ci/run installs it)."""
    from _quota_app import REDIS_SERVER, redis_server

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(autouse=True)
def _clean_lago_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests never see LAGO_* variables of the machine they run on."""
    for name in list(os.environ):
        if name.startswith("LAGO_"):
            monkeypatch.delenv(name)
    yield


@pytest.fixture
def header_settings(fake_lago: Any) -> Any:
    """``BillingSettings`` for an app billing org_a (subscribed to a free plan) on the ``fake_lago`` emulator: org and
    user from the X-Org-Id and X-User-Id headers, no quota gate, quick retries."""
    from lago_org_billing import BillingSettings

    fake_lago.add_plan("starter", amount_cents=0)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    return BillingSettings(
        api_url=fake_lago.base_url,
        api_key=fake_lago.api_key,
        org_header="X-Org-Id",
        user_header="X-User-Id",
        quota_mode="off",
        retry_backoff=0.001,
    )


@pytest.fixture
def tls_files(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    yield cert_file, key_file


@pytest.fixture
def no_write_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed spool write is tried again at the next commit window (the tests count outcomes, not pauses)."""
    from lago_org_billing import _spool

    monkeypatch.setattr(_spool, "_RETRY_FIRST", 0.0)
    monkeypatch.setattr(_spool, "_RETRY_MAX", 0.0)
