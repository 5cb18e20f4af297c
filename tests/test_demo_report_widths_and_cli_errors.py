"""A new user's first five minutes: the Quickstart's ``lago-org-billing demo`` and the CLI's help and errors.

* The demo's report is read in an 80-column terminal: no line of it is wider (the quota's 429 lines were 247
  columns, the addresses 98, the verdict 97: each wrapped mid-word into the next row).
* Its per user and model table shows Lago's own current usage of each (the charge grouped by ``user_id`` and
  ``model``, as the plans price it) next to what the API served, and says NO where they differ: it only compared the
  emulator's raw event list, so a Lago unable to break the usage down per user and model still "agreed" (exit 0).
* A Ctrl-C while the command builds its parser (the first few tenths of a second) is exit 130 without a traceback.
* An option a command does not take is refused with that command's usage, not the top-level one.
* ``lago-org-billing --help`` fits 80 columns.
"""

from __future__ import annotations

from typing import Any

import pytest

from lago_org_billing import _demo
from lago_org_billing.cli import main

WIDTH = 80


def _run_demo(capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["demo"])
    return code, capsys.readouterr().out


def _user_model_rows(out: str) -> list[list[str]]:
    """The rows of the per user and model table: org, user, model, then the numbers and the verdict."""
    table = out.split("Per user and model", 1)[1].split("\n\n", 1)[0]
    return [line.split() for line in table.splitlines() if line.startswith("org_")]


def test_the_demo_report_fits_an_80_column_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run_demo(capsys)
    assert code == 0, out
    wide = [line for line in out.splitlines() if len(line) > WIDTH]
    assert not wide, "\n".join(wide)
    # The wrapped texts still say it all, once each.
    assert out.count("has used 5 of the 5 API calls") == 1, out
    assert "Every request billed exactly once" in out and " 429 " in out


def test_the_demo_shows_lagos_usage_per_user_and_model(capsys: pytest.CaptureFixture[str]) -> None:
    """Each (org, user, model) row: requests served, events Lago received, Lago's events count of that group, the
    tokens served and Lago's units of that group, all agreeing."""
    code, out = _run_demo(capsys)
    assert code == 0, out
    rows = _user_model_rows(out)
    assert len(rows) == 12, out  # 5 users x 2 models, and each org's free /v1/models call
    for org, user, model, served, events, lago_events, tokens, lago_units, agrees in rows:
        assert org in _demo.ORGS and user in _demo.ORGS[org][2] and model in (*_demo.MODELS, "-")
        assert served == events == lago_events and tokens == lago_units and agrees == "yes", (org, user, model)
    assert sum(int(row[6]) for row in rows) > 0


def test_the_demo_says_no_when_lagos_usage_per_user_and_model_disagrees(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Lago whose charge does not group by model (pricing_group_keys without it): the org totals agree, but Lago
    cannot say what each user spent on each model, which the plans price. The demo reported 'Every request billed
    exactly once, Lago agrees' and exit 0."""
    seed = _demo.seed

    def grouped_by_user_only(fake: Any) -> None:
        add = fake.add_plan

        def add_plan(code: str, **options: Any) -> Any:
            for charge in options.get("charges", []):
                charge["properties"] = {**charge["properties"], "pricing_group_keys": ["user_id"]}
            return add(code, **options)

        fake.add_plan = add_plan
        seed(fake)

    monkeypatch.setattr(_demo, "seed", grouped_by_user_only)
    code, out = _run_demo(capsys)
    assert code == 1, out
    assert "MISMATCH: see above." in out
    assert any(row[-1] == "NO" for row in _user_model_rows(out)), out


def test_ctrl_c_while_the_command_line_is_built_is_exit_130_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parser imports the migrate and dead-letters commands (a few tenths of a second of imports): a Ctrl-C then
    printed a KeyboardInterrupt traceback of the imports."""
    from lago_org_billing import _migration_cli

    def interrupted(commands: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_migration_cli, "add_migrate_command", interrupted)
    # (the parser imports a command's module only when the command is given: tests/test_zz_review_startup.py)
    assert main(["migrate", "--mapping-file", "m.csv"]) == 130


@pytest.mark.parametrize("argv", [["demo", "--bogus"], ["health", "extra"], ["emulator", "--serve"]])
def test_an_option_a_command_does_not_take_shows_that_commands_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``lago-org-billing demo --bogus`` answered with the top-level usage (``[-h] [-v] COMMAND ...``), which does not
    show what demo takes."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: lago-org-billing {argv[0]} " in err, err
    assert f"lago-org-billing {argv[0]}: error: unrecognized arguments: {argv[1]}" in err, err
    assert "Traceback" not in err


def test_the_top_level_help_fits_80_columns(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    wide = [line for line in out.splitlines() if len(line) > WIDTH]
    assert not wide, "\n".join(wide)
    assert "LAGO_API_URL" in out and "LAGO_WEBHOOK_HMAC_KEY" in out
