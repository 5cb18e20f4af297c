"""The README as a new user reads it: what it names exists and works as said.

Every ``LAGO_*`` variable the code reads is in the README; the Quickstart is two commands (the demo, the test suite,
the one ``.ci/run`` runs); the Python examples are valid Python importing public names; the CLI synopsis matches
the parser; the metric names, ``OrgBilling`` methods and error classes it names exist; every benchmark is listed.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette

import lago_org_billing
from lago_org_billing import BillingSettings, OrgBillingMiddleware, QuotaConfig
from lago_org_billing.cli import _parser, main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the README section (``##`` or ``###``) named ``title``, up to the next one of any level."""
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", README, re.M | re.S)
    assert match, f"no section {title!r} in README.md"
    return match.group(1)


def blocks(language: str) -> list[str]:
    """The README's fenced blocks of ``language`` ("" for plain ones), fences paired in order."""
    found: list[str] = []
    current: list[str] = []
    kind: str | None = None
    for line in README.splitlines():
        if line.startswith("```"):
            if kind is None:
                kind, current = line[3:].strip(), []
            else:
                if kind == language:
                    found.append("\n".join(current) + "\n")
                kind = None
        elif kind is not None:
            current.append(line)
    return found


def test_every_lago_variable_the_code_reads_is_in_the_readme() -> None:
    read = set()
    for path in (ROOT / "src" / "lago_org_billing").rglob("*.py"):
        read |= set(re.findall(r"[\"'](LAGO_[A-Z0-9_]+)[\"']", path.read_text(encoding="utf-8")))
    assert len(read) > 30, read
    missing = sorted(name for name in read if f"`{name}`" not in README)
    assert not missing, f"read by the code, not in README.md: {missing}"


def test_the_quickstart_is_two_commands_the_demo_and_the_suite_ci_runs() -> None:
    (quickstart,) = [b for b in blocks("bash") if "lago-org-billing demo" in b]
    commands = quickstart.strip().splitlines()
    assert len(commands) == 2, commands
    assert commands[0].endswith("&& lago-org-billing demo"), commands
    assert commands[1].endswith("&& python -m pytest"), commands
    assert all(c.startswith('python -m pip install -e ".[dev]"') for c in commands), commands
    assert commands[1] in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_python_examples_are_python_and_import_public_names() -> None:
    """A decorator without its function (the ``require_quota`` example) is a SyntaxError when pasted."""
    examples = blocks("python")
    assert len(examples) >= 8
    for source in examples:
        tree = ast.parse(source)  # raises on a fragment that is not Python
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "lago_org_billing":
                missing = [a.name for a in node.names if not hasattr(lago_org_billing, a.name)]
                assert not missing, f"README imports {missing} from lago_org_billing"


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings if o not in ("-h", "--help")}


def test_the_cli_synopsis_matches_the_parser() -> None:
    parser = _parser()
    (synopsis,) = [b for b in blocks("") if b.startswith("lago-org-billing ")]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(re.findall(r"^lago-org-billing (?:\[-v\] )?([a-z-]+)", synopsis, re.M)) == set(commands)
    for name, sub in commands.items():
        start = synopsis.index(f" {name} ")
        following = [synopsis.find(f"\nlago-org-billing {other} ", start) for other in commands]
        text = synopsis[start : min([f for f in following if f > start], default=len(synopsis))]
        written = set(re.findall(r"--[a-z][a-z-]*", text))
        assert written == _options(sub), (name, written ^ _options(sub))
    assert "-v" in _options(parser) and "[-v]" in synopsis


def test_the_metric_names_the_readme_gives_exist() -> None:
    from lago_org_billing import _metrics

    counters = {v[0] for v in (*_metrics._COUNTERS.values(), *_metrics._REQUEST_COUNTERS.values())}
    counters |= {f"quota_{name}" for name in _metrics._GATE_COUNTERS}
    exported = {f"{name}_total" for name in counters} | set(_metrics._PIPELINE_DOCS)
    exported |= {f"quota_{name}" for name in _metrics._GATE_GAUGES}
    text = section("Metrics")
    named = {n for n in re.findall(r"`([a-z_]+)`", text) if n.endswith("_total") or n in exported}
    assert {"requests_ungated_total", "background_errors_total", "delivery_seconds"} <= named
    assert named <= exported, named - exported
    # the request counters' plain words: each exported one is mentioned
    for word in ("handled", "billed", "blocked", "unresolved", "excluded", "preflights", "unrouted", "5xx"):
        assert word in text, word


def test_the_original_api_table_names_methods_that_exist() -> None:
    table = section("The original API, mapped")
    methods = set(re.findall(r"`OrgBilling\.([a-z_]+)", table))
    assert len(methods) >= 15
    assert not [m for m in methods if not hasattr(lago_org_billing.OrgBilling, m)]
    for name in ("check_org_has_active_subscription", "get_org_plan_limits", "enforce_usage_limits"):
        assert hasattr(lago_org_billing, name) and hasattr(lago_org_billing.QuotaGate, name)


def test_the_error_tree_is_the_code_one() -> None:
    (tree,) = [b for b in blocks("") if b.startswith("LagoIntegrationError")]
    parents: list[str] = []
    for line in tree.splitlines():
        match = re.match(r"^([│ ]*)(?:[├└]── )?([A-Za-z]+Error)\b", line)
        assert match, line
        depth = len(match.group(1)) // 4 + (1 if "──" in line else 0)
        del parents[depth:]
        cls = getattr(lago_org_billing, match.group(2))
        if parents:
            assert cls.__mro__[1] is getattr(lago_org_billing, parents[-1]), (match.group(2), parents)
        parents.append(match.group(2))


def test_every_benchmark_is_listed() -> None:
    text = section("Development")
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    missing = [s for s in scripts if f"python benchmarks/{s}" not in text]
    assert not missing, f"benchmarks/ scripts the README does not list: {missing}"


def test_quota_config_in_code_still_takes_lago_quota_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: with ``quota_config=QuotaConfig(...)`` the other ``LAGO_QUOTA_*`` variables are not read;
    ``LAGO_QUOTA_MODE`` (a ``BillingSettings`` one) still is."""
    monkeypatch.setenv("LAGO_QUOTA_STATUS", "402")
    settings = BillingSettings(api_key="k", quota_mode="off")
    assert OrgBillingMiddleware(Starlette(), settings=settings, quota_config=QuotaConfig()).quota is None
    enforce = settings.replace(quota_mode="enforce")
    gate = OrgBillingMiddleware(Starlette(), settings=enforce, quota_config=QuotaConfig())
    assert gate.quota is not None and gate.quota.config.over_quota_status == 429  # type: ignore[attr-defined]
    assert re.search(r"`LAGO_QUOTA_MODE`[^.]* still is", README)


def test_the_stats_the_readme_reads_with_brackets_are_there_from_the_start() -> None:
    """README reads ``stats["ungated"]``, ``stats["unrouted"]``...: keys a new middleware has (a dashboard or a test
    reading one before the first such request must not raise KeyError). A key made at its first count is written
    ``stats.get("...", 0)``, or said to exist from the first with the ``.get`` to read it."""
    stats = OrgBillingMiddleware(Starlette(), settings=BillingSettings(api_key="k")).stats
    for match in re.finditer(r'stats\["([a-z_]+)"\]', README):
        said = README[match.end() : match.end() + 120]
        assert match.group(1) in stats or ".get(" in said, (match.group(1), sorted(stats))
    read = re.findall(r'stats\.get\("([a-z_]+)", 0\)', README)
    assert "unbilled_auth_failures" in read and "cold_shed" in read, read


def test_health_says_its_event_code_warning_where_the_readme_says(
    fake_lago_server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """README (CLI): ``health`` warns on stderr when LAGO_EVENT_CODE is no billable metric's code, or, with
    ``--json``, in the report's ``warnings`` (stdout stays one JSON document, stderr empty)."""
    monkeypatch.setenv("LAGO_API_URL", fake_lago_server.url)
    monkeypatch.setenv("LAGO_API_KEY", fake_lago_server.api_key)
    monkeypatch.setenv("LAGO_EVENT_CODE", "no_such_metric")
    assert main(["health"]) == 0
    assert "no_such_metric" in capsys.readouterr().err
    assert main(["health", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and any("no_such_metric" in w for w in json.loads(out)["warnings"]), (out, err)
    said = " ".join(section("CLI").split())
    assert "warns, on stderr or in `--json`'s `warnings`, when `LAGO_EVENT_CODE`" in said
