"""What a new user reads and runs: README.md, examples/, the CLI's help and the public contract agree with the code.

* The shell commands of the examples' docstrings (README: "their docstrings say how to start and curl them") work as
  copied from the file: the emulator command parses and takes the key the app is given, the app starts with the
  variables its command sets, and the curl commands, run by bash as written, get the answers they are for.
* The defaults the README's Configuration table, its ``LAGO_QUOTA_*`` list, the contract's environment table and
  ``lago-org-billing --help`` give are the code's defaults; every variable they name is one the code reads.
* The choices the README's CLI synopsis spells out (``postgres|clickhouse``...) are the parser's.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lago_org_billing import BillingSettings, QuotaConfig
from lago_org_billing.cli import _ENVIRONMENT, _parser
from test_examples import load

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLES = ROOT / "examples"
CONTRACT = ROOT / "tests" / "data" / "contract.md"  # (a copy of shared/docs/contract.md: see its SOURCE file)
SETTINGS_SOURCE = (ROOT / "src" / "lago_org_billing" / "_settings.py").read_text(encoding="utf-8")
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


# ------------------------------------------------------------------------------------------ the examples' commands


def docstring_as_written(path: Path) -> str:
    """The module docstring of ``path`` as the file shows it (what a user copies from an editor): its source text
    between the quotes, escapes not interpreted."""
    source = path.read_text(encoding="utf-8")
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant), f"{path.name} has no docstring"
    segment = ast.get_source_segment(source, node.value)
    assert segment is not None
    match = re.fullmatch(r'[rR]?"""(.*)"""', segment, re.S)
    assert match, segment[:40]
    return match.group(1)


def shell_commands(text: str) -> list[str]:
    """The indented command lines of a docstring, each with its ``\\``-continued lines, as a shell reads them."""
    lines = [line.strip() for line in text.splitlines() if line.startswith("    ") and line.strip()]
    return [command for command in re.split(r"(?<!\\)\n", "\n".join(lines)) if command]


@pytest.mark.parametrize("name", ["starlette_app", "fastapi_app"])
def test_the_example_docstrings_show_the_text_help_shows(name: str) -> None:
    """A command continued with ``\\`` must read the same in the file and in ``help()``/pydoc: in a plain docstring
    a ``\\`` at the end of a line disappears from ``__doc__`` (the lines are joined) and a ``\\\\`` written to show
    one in ``__doc__`` is two in the file, where bash reads an escaped backslash and the next line as a command of
    its own (``-d: command not found``: the org is never created)."""
    path = EXAMPLES / f"{name}.py"
    written = docstring_as_written(path)
    shown = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=False)  # the module's __doc__
    assert written == shown, f"{path.name}: the docstring's text differs from what the file shows"
    for command in shell_commands(written):
        assert "\\\\" not in command, f"{path.name}: a doubled backslash breaks this command when copied: {command}"


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands go to 127.0.0.1: a proxy of the environment (any case) must not take them."""
    for variable in list(os.environ):
        if variable.lower() in PROXY_VARIABLES:
            monkeypatch.delenv(variable)


@dataclasses.dataclass
class Emulator:
    """The examples' emulator as documented: the port and key its command gives, the URL it is served at."""

    url: str
    port: int
    api_key: str


@pytest.fixture
def served_emulator_as_documented(no_proxy: None) -> Iterator[Emulator]:
    """The examples' emulator command (the first of fastapi_app.py's), parsed by the CLI's parser and served as it
    would serve it (on a free port rather than its own)."""
    from lago_org_billing.testing import FakeLago
    from lago_org_billing.testing._server import serve_in_thread

    command = shell_commands(docstring_as_written(EXAMPLES / "fastapi_app.py"))[0]
    words = shlex.split(command.replace("\\\n", " "))  # a continued line, as the shell joins it
    assert words[0] == "lago-org-billing", command
    args = _parser().parse_args(words[1:])
    assert args.command == "emulator" and args.seed and args.api_key, args
    fake = FakeLago.from_seed_file(ROOT / args.seed, api_key=args.api_key, event_store=args.event_store)
    with serve_in_thread(fake) as url:
        yield Emulator(url, args.port, args.api_key)


def app_environment(command: str, lago_url: str, documented_port: int) -> tuple[dict[str, str], str]:
    """The variables ``command`` (``A=1 B=2 uvicorn module:app --port P``) sets, its LAGO_API_URL checked against
    the emulator's documented port and pointed at the served one; and the app's ``module:app``."""
    words = shlex.split(command.replace("\\\n", " "))  # a continued line, as the shell joins it
    assignments = dict(word.split("=", 1) for word in words if re.match(r"^[A-Z_]+=", word))
    rest = [word for word in words if not re.match(r"^[A-Z_]+=", word)]
    assert rest[0] == "uvicorn", command
    assert assignments["LAGO_API_URL"] == f"http://127.0.0.1:{documented_port}", command
    return {**assignments, "LAGO_API_URL": lago_url}, rest[1]


def run_curls(commands: list[str], app_url: str) -> subprocess.CompletedProcess[str]:
    """The docstring's curl commands, as written, run by bash (stopping at the first failing one)."""
    script = "set -e\n" + "\n".join(commands).replace("localhost:8000", app_url)
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT, env=os.environ
    )


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("bash") is None, reason="needs curl and bash")
def test_the_fastapi_example_runs_as_its_docstring_says(
    served_emulator_as_documented: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: the apps of examples/ run against the emulator command their docstrings show, and say how to curl
    them. Copied from fastapi_app.py, the org-creation curl ended in ``\\\\``: curl got no body (a 422) and bash ran
    ``-d '{...}'`` as a command of its own."""
    from lago_org_billing.testing._server import serve_in_thread

    emulator = served_emulator_as_documented
    commands = shell_commands(docstring_as_written(EXAMPLES / "fastapi_app.py"))[1:]
    environment, target = app_environment(commands[0], emulator.url, emulator.port)
    assert environment["LAGO_API_KEY"] == emulator.api_key, "the app is given another key than the emulator takes"
    assert target == "examples.fastapi_app:app"
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    module = load("fastapi_app")
    with serve_in_thread(module.app) as app_url:
        done = run_curls(commands[1:], app_url.removeprefix("http://"))
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert '"org_id":"org_acme"' in done.stdout and "Hello!" in done.stdout, done.stdout
    assert '"plan":{"code":"starter"' in done.stdout, done.stdout  # the dashboard


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("bash") is None, reason="needs curl and bash")
def test_the_starlette_example_runs_as_its_docstring_says(
    served_emulator_as_documented: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for starlette_app.py: one emulator for both, the header variables its command sets, its curl."""
    from lago_org_billing.testing._server import serve_in_thread

    emulator = served_emulator_as_documented
    commands = shell_commands(docstring_as_written(EXAMPLES / "starlette_app.py"))
    assert commands[0] == shell_commands(docstring_as_written(EXAMPLES / "fastapi_app.py"))[0]  # one emulator
    environment, target = app_environment(commands[1], emulator.url, emulator.port)
    assert environment["LAGO_API_KEY"] == emulator.api_key and target == "examples.starlette_app:app"
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    module = load("starlette_app")
    with serve_in_thread(module.app) as app_url:
        done = run_curls(commands[2:], app_url.removeprefix("http://"))
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert '"total_tokens":42' in done.stdout, done.stdout


# ------------------------------------------------------------------------------------------ documented defaults


def _field_of(variable: str) -> str:
    """The BillingSettings field ``variable`` is read into (``get("LAGO_X", parse, "field")`` in from_env)."""
    match = re.search(rf'get\("{variable}", \w+, "(\w+)"\)', SETTINGS_SOURCE)
    assert match, f"{variable} is not read by BillingSettings.from_env"
    return match.group(1)


def _settings_default(field: str) -> Any:
    for f in dataclasses.fields(BillingSettings):
        if f.name == field:
            return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    raise AssertionError(field)


def _shown(value: Any) -> str:
    """A default as the docs write it."""
    if value is None or value == "":
        return "unset"
    if value == ():
        return "empty"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict):
        return "{}" if not value else repr(value)
    return str(value)


def _documented(cell: str) -> str:
    """A table cell's default, normalised: ``unset (memory)`` -> unset, ``none`` -> unset, backticks dropped."""
    text = cell.strip().replace("`", "")
    if text.startswith(("unset", "none")):
        return "unset"
    return text.split(" (")[0]


def _table_rows(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^\| `(LAGO_[A-Z_]+)` \|.*\| ([^|]+) \|$", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_the_readme_configuration_table_gives_the_codes_defaults() -> None:
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = _table_rows(section)
    assert len(rows) >= 20, rows
    rows.pop("LAGO_API_KEY")  # required: no default to compare
    wrong = {
        variable: (documented, _shown(_settings_default(_field_of(variable))))
        for variable, cell in rows.items()
        if (documented := _documented(cell)) != _shown(_settings_default(_field_of(variable)))
    }
    assert not wrong, f"README default vs code default: {wrong}"


def test_the_readme_says_the_retry_deadline_follows_the_timeout() -> None:
    """README: LAGO_RETRY_DEADLINE defaults to 30; left unset with a LAGO_API_TIMEOUT of 60 it is 60 (a call always
    gets its whole timeout), which the row should say."""
    settings = BillingSettings.from_env(None, environ={"LAGO_API_KEY": "k", "LAGO_API_TIMEOUT": "60"})
    assert settings.retry_deadline == 60
    (row,) = [line for line in README.splitlines() if line.startswith("| `LAGO_RETRY_DEADLINE` |")]
    assert "LAGO_API_TIMEOUT" in row, row


@pytest.mark.skipif(not CONTRACT.is_file(), reason="shared/docs/contract.md is not beside the repository")
def test_the_contracts_environment_table_is_the_codes_and_the_readmes() -> None:
    rows = _table_rows(CONTRACT.read_text(encoding="utf-8"))
    assert len(rows) >= 15, rows
    readme_rows = _table_rows(README.split("## Configuration", 1)[1].split("\n## ", 1)[0])
    rows.pop("LAGO_API_KEY")
    for variable, cell in rows.items():
        assert variable in readme_rows, f"{variable} is in the contract, not in README's Configuration table"
        assert _documented(cell) == _shown(_settings_default(_field_of(variable))), (variable, cell)


def test_the_cli_help_names_variables_the_code_reads_with_their_defaults() -> None:
    """``lago-org-billing --help`` lists the environment: each variable read by the code, each default the code's."""
    listed = re.findall(r"^  (LAGO_[A-Z_]+) +(.*)$", _ENVIRONMENT, re.M)
    assert len(listed) >= 15, listed
    for variable, text in listed:
        default = re.search(r"\(default:? ([^)]+)\)", text)
        field = _field_of(variable)
        if default and not default.group(1).startswith(("in memory", "JWT")):
            assert default.group(1) == _shown(_settings_default(field)), (variable, text)


def test_the_readme_quota_variables_give_quota_configs_defaults() -> None:
    """README (Quota gating): "More LAGO_QUOTA_* variables (QuotaConfig.from_env()): LAGO_QUOTA_STATUS (429/402)..."
    the first value given is the default."""
    text = README.split("More `LAGO_QUOTA_*` variables", 1)[1].split("Or in code", 1)[0]
    pairs = dict(re.findall(r"`(LAGO_QUOTA_[A-Z_]+)` \(([^)]*)\)", text))
    assert len(pairs) >= 15, pairs
    config = QuotaConfig.from_env(environ={})
    source = (ROOT / "src" / "lago_org_billing" / "_quota.py").read_text(encoding="utf-8")
    fields = dict(re.findall(r'"(LAGO_QUOTA_[A-Z_]+)",\s*(?:cls\.)?"?(\w+)"?(?:\)|, duration=True)', source))
    fields |= {
        "LAGO_QUOTA_STATUS": "over_quota_status",
        "LAGO_QUOTA_NO_SUBSCRIPTION": "no_subscription",
        "LAGO_QUOTA_NO_SUBSCRIPTION_STATUS": "no_subscription_status",
        "LAGO_QUOTA_REFRESH_CONCURRENCY": "max_concurrent_refreshes",
    }
    for variable, documented in pairs.items():
        value = getattr(config, fields[variable])
        if value is None:  # LAGO_QUOTA_TOKEN_METRIC: LAGO_EVENT_CODE's
            assert "LAGO_EVENT_CODE" in documented, (variable, documented)
            continue
        first = re.split(r"[/ ]", documented.replace("`", ""), maxsplit=1)[0]
        assert first == _shown(value), (variable, documented, value)


# ------------------------------------------------------------------------------------------ the CLI synopsis


def test_the_synopsis_choices_are_the_parsers() -> None:
    (synopsis,) = re.findall(r"^## CLI\n\n```\n(.*?)```", README, re.M | re.S)
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    written = dict(re.findall(r"(--[a-z-]+) ([a-z]+(?:\|[a-z]+)+)", synopsis))
    assert len(written) >= 5, written
    for option, choices in written.items():
        actions = [a for sub in commands.values() for a in sub._actions if option in a.option_strings]
        assert actions and all(a.choices is not None for a in actions), option
        for action in actions:
            assert choices.split("|") == list(action.choices), (option, choices, action.choices)  # type: ignore[arg-type]
