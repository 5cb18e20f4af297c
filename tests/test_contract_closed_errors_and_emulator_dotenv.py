"""The public contract (docs/contract.md, README, the CLI's own help):

- ``LagoIntegrationError`` is promised as the "base of every error the package raises", but using a ``LagoClient``
  (directly, or through ``OrgBilling``) after it was closed raises a bare ``RuntimeError``, and so do
  ``EventPipeline.flush()`` before ``run`` and ``EventPipeline.replay_dead_letters()`` after ``aclose()``: a caller's
  ``except LagoIntegrationError`` (a background job retrying later) lets them through. The nowait path of a closed
  pipeline already raises ``ConfigurationError`` (CHANGELOG), so the package is not even consistent with itself.
- ``lago-org-billing emulator`` ignores ``LAGO_API_KEY`` written in ``./.env``, although the CLI's help says the
  environment is "also read from ./.env" and ``health``, ``migrate`` and the app itself do read it there: the app
  sends the ``.env`` key, the emulator wants ``lago-emulator-key``, and every call is a 401.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lago_org_billing import (
    BillingSettings,
    EventPipeline,
    LagoClient,
    LagoIntegrationError,
    OrgBilling,
)
from lago_org_billing.cli import main

# ---------------------------------------------------------------------- LagoIntegrationError is the base of every error


@pytest.mark.anyio
async def test_a_closed_lago_client_raises_a_lago_integration_error(
    fake_lago: Any, lago_settings: BillingSettings
) -> None:
    client = LagoClient(lago_settings, transport=fake_lago.transport())
    await client.aclose()
    with pytest.raises(LagoIntegrationError, match="closed"):
        await client.get_customer("org_1")
    with pytest.raises(LagoIntegrationError, match="closed"):
        async with client:
            pass  # pragma: no cover


@pytest.mark.anyio
async def test_org_billing_used_after_its_block_raises_a_lago_integration_error(
    fake_lago: Any, lago_settings: BillingSettings
) -> None:
    """A job holding the service past the app's shutdown (its ``async with`` ended) catches the package's errors."""
    async with OrgBilling(lago_settings, transport=fake_lago.transport()) as billing:
        assert await billing.get_customer("org_1") is None
    with pytest.raises(LagoIntegrationError):
        await billing.record_usage("org_1", "api_call", "tx_after_close", {"tokens": 1})
    with pytest.raises(LagoIntegrationError):
        await billing.get_customer("org_1")


@pytest.mark.anyio
async def test_event_pipeline_misuse_raises_lago_integration_errors(
    fake_lago: Any, lago_settings: BillingSettings
) -> None:
    pipeline = EventPipeline(LagoClient(lago_settings, transport=fake_lago.transport()))
    with pytest.raises(LagoIntegrationError, match="running"):
        await pipeline.flush()
    await pipeline.aclose()
    with pytest.raises(LagoIntegrationError, match="closed"):
        await pipeline.replay_dead_letters()


# ---------------------------------------------------------------------- the emulator reads ./.env as the CLI help says


def test_the_emulator_takes_the_api_key_of_the_dotenv_file_as_the_cli_help_says(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lago-org-billing --help``: "environment (also read from ./.env ...): LAGO_API_KEY ..."; README: the emulator
    takes ``--api-key``, else ``LAGO_API_KEY``. The app and ``health`` in that directory read the ``.env`` key."""
    from lago_org_billing.testing import _server

    served: list[Any] = []
    monkeypatch.setattr(_server, "run", lambda fake, *args, **kwargs: served.append(fake))  # (never served)
    monkeypatch.delenv("LAGO_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("LAGO_API_URL=http://127.0.0.1:3000\nLAGO_API_KEY=dev-key\n", encoding="utf-8")
    assert BillingSettings.from_env().api_key == "dev-key"  # what the app (and `health`) run here send
    assert "also read from ./.env" in _help(capsys)

    assert main(["emulator", "--port", "0"]) == 0
    [fake] = served
    printed = capsys.readouterr().out
    assert fake.api_key == "dev-key", f"the emulator takes {fake.api_key!r}, the app sends 'dev-key': {printed!r}"


def _help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        main(["--help"])
    return capsys.readouterr().out
