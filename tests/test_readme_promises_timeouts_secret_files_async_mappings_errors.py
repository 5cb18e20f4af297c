"""The README's promises, lines 440-886 (delivery guarantees, metrics, running in production,
configuration, errors, CLI), each checked against what the package does."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import lago_org_billing
from lago_org_billing import LagoIntegrationError, QuotaConfig
from lago_org_billing._migration import EntitlementsUnreadableError
from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago
from test_dead_letters import letter_ids, spool_with_letters
from test_delivery import make_fake
from test_seed_promises_kept import migrate


class SilentLago:
    """A server that takes connections and never answers (a Lago hung behind a load balancer, a firewall dropping the
    answers), counting the connections made to it."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # (closed)
                return
            self.accepted.append(connection)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # (wakes the accept() waiting in its thread)
        self.listener.close()
        self.thread.join(5)
        for connection in self.accepted:
            connection.close()


def test_dead_letters_replay_timeout_bounds_the_whole_run_when_lago_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """README (CLI): "If Lago does not answer within `--timeout` (60 s for the whole run), the letters not answered
    yet are left as they were" (exit 1). The replay first probed Lago (``GET /customers``) with the client's own
    retries (LAGO_MAX_RETRIES, LAGO_RETRY_DEADLINE 30 s), outside the --timeout: against a Lago that does not answer,
    ``--timeout 0.5`` ran for several LAGO_API_TIMEOUTs (up to 30 s at the defaults, then the whole --timeout again
    for the events). Now the probe is cut at the --timeout: one connection made, the one it was waiting on."""
    path = tmp_path / "spool.db"
    anyio.run(spool_with_letters, path, make_fake())
    before = letter_ids(path)
    lago = SilentLago()
    try:
        monkeypatch.setenv("LAGO_API_URL", lago.url)
        monkeypatch.setenv("LAGO_API_KEY", "k")
        monkeypatch.setenv("LAGO_API_TIMEOUT", "5")  # (each attempt's wait, longer than --timeout)
        code = main(["dead-letters", "--spool", str(path), "--replay", "--timeout", "0.5"])
    finally:
        lago.close()
    captured = capsys.readouterr()
    assert code == 1 and "did not answer" in captured.err, captured
    assert letter_ids(path) == before
    assert len(lago.accepted) == 1, f"{len(lago.accepted)} connections: retried past --timeout"


# ------------------------------------------------------------------------------------------ configuration


def test_a_quota_variable_read_from_a_secret_file_is_not_silently_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README (Configuration): "any variable can be read from a file instead (`LAGO_API_KEY_FILE=/run/secrets/...`)".
    ``BillingSettings.from_env`` reads ``<NAME>_FILE`` for each of its variables, but ``QuotaConfig.from_env`` (every
    ``LAGO_QUOTA_*``, read by the middleware's gate) never looks at one: a deployment templating its settings as
    mounted files (a ConfigMap or secret per variable) gets the defaults, with no word said (here the over-quota
    answer stays 429 where 402 was configured)."""
    status = tmp_path / "quota_status"
    status.write_text("402\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # (no .env)
    monkeypatch.delenv("LAGO_QUOTA_STATUS", raising=False)
    monkeypatch.setenv("LAGO_QUOTA_STATUS_FILE", str(status))
    assert QuotaConfig.from_env().over_quota_status == 402


# ------------------------------------------------------------------------------------------------ errors


def test_every_error_a_documented_call_raises_can_be_imported_from_the_package() -> None:
    """README (CLI, migrate): when ``GET /features`` is refused, ``--execute`` stops before any write "and so does
    `OrgBilling.migrate_user_to_org`" (and ``run_migration``): they raise ``EntitlementsUnreadableError``. It is in
    neither the README's Errors tree nor ``lago_org_billing``'s names (its sibling ``UnmovedHoldingsError`` is): code
    catching it must import a private module (``lago_org_billing._migration``)."""
    assert issubclass(EntitlementsUnreadableError, LagoIntegrationError)
    assert getattr(lago_org_billing, "EntitlementsUnreadableError", None) is EntitlementsUnreadableError


# ------------------------------------------------------------------------------------------ migrate mapping


async def async_generator_rows() -> AsyncIterator[dict[str, Any]]:
    """An async mapping function streaming its query's rows (``async for row in await conn.stream(query): yield``)."""
    for row in ({"user_id": "u1", "org_id": "acme", "org_name": "Acme", "email": "a@acme.test"},):
        await anyio.lowlevel.checkpoint()
        yield row


def test_an_async_generator_mapping_callable_is_read_like_an_async_function() -> None:
    """README (CLI): "`--mapping-callable module:function` (...: a function, sync or async, taking no arguments and
    returning rows...)". A sync generator is read, an async function's list is read, but an async generator (the
    natural way to stream an async database query's rows) is refused: exit 2, "must return an iterable of rows", with
    nothing saying what to change."""
    fake = FakeLago(api_key="k")
    fake.add_plan("starter", amount_cents=1000)
    fake.add_customer("u1")
    fake.add_subscription("u1", "starter", external_id="sub_u1")
    code, out, err = migrate(fake, "--mapping-callable", f"{__name__}:async_generator_rows")
    assert "must return an iterable of rows" not in err
    assert code == 0, err
    assert "acme" in out
    assert fake.write_requests == []
