"""Child process of the kill test: ``python _migration_child.py [--freeze-after N] migrate ...``.

Runs the real ``lago-org-billing`` entry point. With ``--freeze-after N`` it prints ``FROZEN <N>`` once N orgs
are done and then blocks the event loop (other orgs stay half-way through their steps) until the parent
kills it with SIGKILL.
"""

from __future__ import annotations

import sys
import threading

from lago_org_billing import _migration_cli
from lago_org_billing._migration import OrgResult
from lago_org_billing.cli import main


def freeze_after(limit: int) -> None:
    def hook(result: OrgResult, done: int, total: int) -> None:
        if done >= limit:
            print(f"FROZEN {done}", flush=True)
            threading.Event().wait()  # never set: the parent kills this process

    _migration_cli.ORG_DONE_HOOK = hook


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--freeze-after"]:
        freeze_after(int(argv[1]))
        argv = argv[2:]
    sys.exit(main(argv))
