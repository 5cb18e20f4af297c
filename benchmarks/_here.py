"""Every benchmark measures the checkout it is in: its ``src`` first on ``sys.path`` and on the ``PYTHONPATH`` of what
it starts (servers, children), whatever package the running interpreter has installed.

Without it a baseline run from another checkout (``git worktree add /tmp/old <rev>``, then
``python /tmp/old/benchmarks/overhead.py``) imported the package installed in the venv (an editable install of the
main checkout): the "baseline" measured the same code as the run it was compared with.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def use_this_checkout() -> None:
    """Put this checkout's ``src`` (then its root, for ``benchmarks`` and ``tests``) first, here and for children."""
    entries = [str(ROOT / "src"), str(ROOT)]
    sys.path[:0] = [entry for entry in entries if entry not in sys.path[:2]]
    inherited = [
        entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry and entry not in entries
    ]
    os.environ["PYTHONPATH"] = os.pathsep.join([*entries, *inherited])
