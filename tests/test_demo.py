"""The Quickstart's first command, `lago-org-billing demo`, ends by itself with everything agreeing."""

from __future__ import annotations

import pytest

from lago_org_billing.cli import main


def test_demo_runs_and_agrees(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo serves traffic, Lago's usage matches it, and the quota blocks then unblocks an org."""
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "Every request billed exactly once" in out
    assert "MISMATCH" not in out
    assert " 429 " in out


def test_demo_is_not_affected_by_the_environments_quota_variables(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo runs its own emulator with its own settings: LAGO_QUOTA_* meant for the user's app (here a 402 for
    over-quota answers, another feature name) do not change it (it reported MISMATCH and exited 1)."""
    monkeypatch.setenv("LAGO_QUOTA_STATUS", "402")
    monkeypatch.setenv("LAGO_QUOTA_FEATURE", "other")
    assert main(["demo"]) == 0
    assert "MISMATCH" not in capsys.readouterr().out
