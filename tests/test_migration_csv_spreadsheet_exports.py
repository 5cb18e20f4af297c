"""Migration CSV mappings as spreadsheets export them (Excel, LibreOffice, Google Sheets): rows of empty cells where a
sheet had formatted or cleared rows (``,,,``), and a header with unnamed columns after the last named one (a used range
wider than the data). Those are no rows and no columns: the file is read as the same mapping without them, while a
value in an unnamed column, or a row with only some cells empty, is still refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from lago_org_billing import BillingSettings
from lago_org_billing._migration import MappingError, build_mapping, read_mapping_file

SETTINGS = BillingSettings(api_key="k")


def users_by_org(path: Path) -> dict[str, tuple[str, ...]]:
    orgs, _ = build_mapping(read_mapping_file(path), SETTINGS)
    return {org.org_id: org.users for org in orgs}


def test_rows_of_empty_cells_are_skipped_as_blank_lines(tmp_path: Path) -> None:
    """``,,,`` rows (between rows and after the last) were refused as three problems each ("empty user_id", "empty
    org_id", "empty org_name"): an export of a sheet with cleared rows could not be used as it is."""
    path = tmp_path / "export.csv"
    path.write_text(
        "user_id,org_id,org_name,email\r\nu1,o1,One,a@x.test\r\n,,,\r\n u2 ,o1,One,\r\n , , ,\r\n,,,\r\n",
        encoding="utf-8",
        newline="",
    )
    with pytest.raises(MappingError) as caught:  # (the row with a value is still checked, on its own line)
        users_by_org(path)
    assert caught.value.problems == [
        "export.csv line 4: user_id ' u2 ' has leading or trailing blanks; Lago would strip them."
    ]
    path.write_text(path.read_text(encoding="utf-8").replace(" u2 ", "u2"), encoding="utf-8", newline="")
    assert users_by_org(path) == {"o1": ("u1", "u2")}
    records = read_mapping_file(path)
    assert [where for where, _ in records] == ["export.csv line 2", "export.csv line 4"]


def test_a_row_with_some_cells_empty_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text("user_id,org_id,org_name,email\nu1,o1,One,\n,o2,,\n", encoding="utf-8")
    with pytest.raises(MappingError) as caught:
        users_by_org(path)
    assert caught.value.problems == ["export.csv line 3: empty user_id", "export.csv line 3: empty org_name"]


def test_unnamed_columns_after_the_header_are_ignored_while_empty(tmp_path: Path) -> None:
    """``user_id,org_id,org_name,email,,`` was refused with "header: column(s) given more than once: " (naming none)
    and "unknown column(s) '', ''"."""
    path = tmp_path / "export.csv"
    path.write_text("user_id,org_id,org_name,email,,\nu1,o1,One,a@x.test,,\nu2,o1,One,,,\n,,,,,\n", encoding="utf-8")
    assert users_by_org(path) == {"o1": ("u1", "u2")}
    # a value in an unnamed column is not dropped without a word
    path.write_text("user_id,org_id,org_name,email,,\nu1,o1,One,a@x.test,,\nu2,o1,One,,pro,\n", encoding="utf-8")
    with pytest.raises(MappingError) as caught:
        users_by_org(path)
    assert caught.value.problems == [
        "export.csv line 3: more fields than the header has columns (a comma inside an unquoted name?)"
    ]


def test_an_unnamed_column_among_named_ones_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text("user_id,,org_id,,org_name,email\nu1,,o1,,One,\n", encoding="utf-8")
    with pytest.raises(MappingError) as caught:
        users_by_org(path)
    assert caught.value.problems == [
        "export.csv header: unnamed column(s) 2, 4 (expected user_id,org_id,org_name,email[,plan_code])"
    ]


def test_rows_of_empty_cells_before_the_header_are_skipped(tmp_path: Path) -> None:
    """As blank lines before the header are (a sheet whose first rows were cleared)."""
    path = tmp_path / "export.csv"
    path.write_text(",,,\n,,,\nuser_id,org_id,org_name,email\nu1,o1,One,\n", encoding="utf-8")
    assert users_by_org(path) == {"o1": ("u1",)}
    assert [where for where, _ in read_mapping_file(path)] == ["export.csv line 4"]
