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
