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
