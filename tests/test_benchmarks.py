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


def test_a_benchmark_run_from_another_checkout_measures_that_checkout(tmp_path: Path) -> None:
    """A baseline run from another checkout (``git worktree add /tmp/old <rev>``) imported the package installed in
    the venv (this checkout, editable), for itself and the servers it starts: it measured the same code as the run it
    was compared with. benchmarks/_here.py puts the checkout's own ``src`` first, here and for children."""
    other = tmp_path / "checkout"
    (other / "benchmarks").mkdir(parents=True)
    (other / "benchmarks" / "__init__.py").write_text("")
    (other / "benchmarks" / "_here.py").write_text((ROOT / "benchmarks" / "_here.py").read_text())
    (other / "src" / "lago_org_billing").mkdir(parents=True)
    (other / "src" / "lago_org_billing" / "__init__.py").write_text("CHECKOUT = 'other'\n")
    script = other / "benchmarks" / "probe.py"
    script.write_text(
        "import subprocess, sys\n"
        "from pathlib import Path\n"
        "sys.path.insert(0, str(Path(__file__).resolve().parent.parent))\n"
        "from benchmarks._here import use_this_checkout\n"
        "use_this_checkout()\n"
        "import lago_org_billing\n"
        "print(getattr(lago_org_billing, 'CHECKOUT', 'installed'))\n"
        'code = \'import lago_org_billing as p; print(getattr(p, "CHECKOUT", "installed"))\'\n'
        "child = [sys.executable, '-c', code]\n"
        "print(subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip())\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["other", "other"]
