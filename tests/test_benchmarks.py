"""The benchmark scripts still run against the package as it is (they are run by hand, so nothing else notices
when a refactor breaks them). Only their in-process parts, tiny, in a subprocess: they set environment variables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py"))

SMOKE = """
import asyncio, importlib, sys
sys.path.insert(0, {root!r})
for name in {modules!r}:
    importlib.import_module("benchmarks." + name)
from benchmarks import instructions, request_path
asyncio.run(request_path.main(50, 1))
for app in instructions.IN_PROCESS:
    asyncio.run(instructions._serve(app, 20))
print("smoke ok")
"""


def test_benchmark_scripts_import_and_their_in_process_parts_run() -> None:
    assert {"overhead", "delivery", "quota", "request_path", "instructions"} <= set(MODULES)
    run = subprocess.run(
        [sys.executable, "-c", SMOKE.format(root=str(ROOT), modules=MODULES)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "smoke ok" in run.stdout
    assert "billed (event build)" in run.stdout


GATES = """
import sys
sys.path.insert(0, {root!r})
from benchmarks.overhead import app_env
for app in ("billed", "request-path", "request_path"):
    assert app_env(app).get("LAGO_QUOTA_MODE") == "off", (app, app_env(app))  # (the package's default: enforce)
for app in ("gated", "gated-quiet"):
    assert app_env(app)["LAGO_QUOTA_MODE"] == "enforce", app
try:
    app_env("billed-something-new")
except KeyError:
    pass
else:
    raise AssertionError("an app without an environment must be refused")
print("gates ok")
"""


def test_the_server_benchmarks_run_each_billing_app_with_the_gate_it_is_meant_to_have() -> None:
    """The ``request-path`` app (the billed app's request path alone) once ran with the package's default quota
    mode, enforce, while the billed app it is compared with ran with it off: the breakdown charged the gate to the
    request path. Every billing app's environment says its quota mode; an app without one is refused."""
    run = subprocess.run(
        [sys.executable, "-c", GATES.format(root=str(ROOT))], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "gates ok" in run.stdout
