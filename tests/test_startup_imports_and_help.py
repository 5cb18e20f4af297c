"""Import cost and startup: what ``import lago_org_billing``, ``from lago_org_billing import OrgBillingMiddleware`` and
``lago-org-billing --help`` import, the lazy public names (``__all__``, ``dir()``, ``import *``, the ``TYPE_CHECKING``
block type checkers and IDEs read), a Ctrl-C while the CLI imports, and the width of the commands' ``--help``.

* ``lago-org-billing --help`` imported every command's module (the migration, the spool, httpx, starlette, anyio,
  sqlite3: ~290 modules, ~0.2 s) to print a page of text; it imports none of them now.
* A Ctrl-C while the CLI's module imported starlette and anyio (``from lago_org_billing.cli import main``, before
  ``main`` could catch it) was a traceback: it is exit 130 with no traceback now.
* ``lago-org-billing migrate --help`` had lines of up to 156 columns: it fits 80 now.

Each check of what is imported runs in a fresh interpreter (``sys.modules`` of this one holds everything).
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import lago_org_billing
from lago_org_billing.cli import _parser, main

WIDTH = 80
INIT = Path(lago_org_billing.__file__)

#: Imported only by what uses them: never by importing the package or the middleware.
OPTIONAL = (
    "jwt",
    "cryptography",
    "prometheus_client",
    "redis",
    "uvicorn",
    "lago_org_billing.testing",
    "lago_org_billing._migration",
    "lago_org_billing._migration_cli",
    "lago_org_billing._dead_letters",
    "lago_org_billing._demo",
    "lago_org_billing._jwks",
)
#: What the top-level ``--help`` has no use for.
HEAVY = (*OPTIONAL, "httpx", "starlette", "anyio", "asyncio", "sqlite3", "cachetools", "lago_org_billing._errors")


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": str(WIDTH)},
        cwd=INIT.parent.parent.parent,
    )


def _imported_after(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))\n"
    run = _run(code)
    assert run.returncode == 0, run.stderr
    return set(json.loads(run.stdout.splitlines()[-1]))


def test_importing_the_package_imports_nothing_optional() -> None:
    modules = _imported_after("import lago_org_billing")
    assert not {m for m in modules if m.startswith(HEAVY)}, sorted(m for m in modules if m.startswith(HEAVY))
    assert sorted(m for m in modules if m.startswith("lago_org_billing")) == [
        "lago_org_billing",
        "lago_org_billing._version",
    ]


def test_importing_the_middleware_imports_nothing_optional() -> None:
    """(sqlite3 is imported as well, by ``_spool`` at its top: see the report; not asserted here.)"""
    modules = _imported_after("from lago_org_billing import OrgBillingMiddleware")
    assert "lago_org_billing._middleware" in modules
    found = sorted(m for m in modules if m.startswith(OPTIONAL))
    assert not found, found


def test_every_public_name_resolves_in_a_fresh_interpreter_and_through_import_star() -> None:
    code = (
        "import lago_org_billing as p\n"
        "names = {}\n"
        "exec('from lago_org_billing import *', names)\n"
        "missing = [n for n in p.__all__ if n not in names or names[n] is not getattr(p, n)]\n"
        "undir = [n for n in p.__all__ if n not in dir(p)]\n"
        "print(missing, undir)\n"
    )
    run = _run(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[] []"


def test_the_type_checking_block_names_every_public_name_from_the_module_defining_it() -> None:
    """mypy, pyright and IDEs see the lazy names through the ``if TYPE_CHECKING:`` block: it must name each of them,
    from the module ``__getattr__`` imports it from."""
    tree = ast.parse(INIT.read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    seen = {
        alias.asname or alias.name: "." * node.level + (node.module or "")
        for node in block.body
        if isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names
    }
    exports = lago_org_billing._EXPORTS
    assert seen == exports
    assert set(exports) == set(lago_org_billing.__all__) - {"__version__"}


def test_the_top_level_help_imports_no_command_module() -> None:
    code = (
        "import sys, json\n"
        "from lago_org_billing.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as exc:\n    assert exc.code == 0\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    run = _run(code)
    assert run.returncode == 0, run.stderr
    modules = set(json.loads(run.stdout.splitlines()[-1]))
    heavy = sorted(m for m in modules if m.startswith(HEAVY))
    assert not heavy, heavy
    assert "migrate" in run.stdout and "dead-letters" in run.stdout


def test_the_top_level_help_lists_each_command_as_its_own_module_says() -> None:
    """The top-level help names migrate and dead-letters without importing their modules: with their own help line."""

    def helps(parser: argparse.ArgumentParser) -> dict[str, str | None]:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return {choice.dest: choice.help for choice in sub._choices_actions}

    assert helps(_parser(())) == helps(_parser())


@pytest.mark.parametrize(
    "argv",
    [
        ["migrate", "--mapping-file", "m.csv", "--bogus"],
        ["-v", "dead-letters", "--bogus"],
        ["dead-letters", "--summary", "--spool", "migrate", "--bogus"],
    ],
)
def test_a_command_named_anywhere_is_parsed_by_its_full_parser(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    command = next(a for a in argv if not a.startswith("-"))
    assert f"lago-org-billing {command}: error: unrecognized arguments: --bogus" in err, err


_INTERRUPT_ON = (
    "import sys\n"
    "class Interrupt:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in {'starlette', 'anyio', 'httpx'}:\n"
    "            raise KeyboardInterrupt\n"
    "sys.meta_path.insert(0, Interrupt())\n"
    "from lago_org_billing.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_ctrl_c_while_the_cli_imports_is_exit_130_without_a_traceback() -> None:
    """A Ctrl-C while importing what a command needs (as a slow disk or a cold container makes it last) is an
    interrupted run: exit 130, no traceback."""
    run = _run(_INTERRUPT_ON, "health")
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 130


def test_the_help_is_printed_without_the_libraries() -> None:
    """``--help`` needs none of the libraries (they are not even imported: a Ctrl-C on them cannot happen)."""
    run = _run(_INTERRUPT_ON, "--help")
    assert run.returncode == 0, run.stderr
    assert "usage: lago-org-billing" in run.stdout


@pytest.mark.parametrize("command", ["migrate", "emulator", "health", "demo", "dead-letters"])
def test_each_command_help_fits_80_columns(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    wide = [line for line in out.splitlines() if len(line) > WIDTH]
    assert not wide, "\n".join(wide)


def test_the_migrate_usage_names_every_option() -> None:
    """The migrate usage is written out (argparse's own ran to 90 columns): it must name each option the parser
    takes and their choices, so that one added later is not left out of it."""
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    migrate = sub.choices["migrate"]
    usage = migrate.format_usage()
    for action in migrate._actions:
        if action.option_strings:  # (the usage shows the first spelling of each)
            assert action.option_strings[0] in usage, action.option_strings[0]
        if action.choices:
            assert "{" + ",".join(action.choices) + "}" in usage, action.choices


def test_a_misspelt_public_name_is_a_type_checker_error(tmp_path: Path) -> None:
    """The lazy names' module ``__getattr__`` (returning ``Any``) was seen by mypy and pyright: any name at all was
    then taken from the package, ``from lago_org_billing import OrgBilingMiddleware`` passing ``mypy --strict``
    (the error came in production). Type checkers see the ``TYPE_CHECKING`` imports only now."""
    pytest.importorskip("mypy")
    code = (
        "import lago_org_billing\n"
        "from lago_org_billing import OrgBillingMiddleware, OrgBilingMiddleware\n"
        "client: lago_org_billing.LagoClient | None = None\n"
        "print(OrgBillingMiddleware, OrgBilingMiddleware, client, lago_org_billing.LagoClent)\n"
        "from lago_org_billing.testing import FakeLago, FakeLgo, serve_in_thread\n"
        "print(FakeLago, FakeLgo, serve_in_thread)\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path), "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 3, run.stdout + run.stderr
    assert '"OrgBilingMiddleware"' in errors[0] and '"LagoClent"' in errors[1], errors
    assert '"FakeLgo"' in errors[2], errors  # (lago_org_billing.testing: the same lazy names)
