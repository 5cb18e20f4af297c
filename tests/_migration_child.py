"""Child process of the kill tests: ``python _migration_child.py [--freeze-after N | --freeze-at 'METHOD PATH'] migrate
...``.

Runs the real ``lago-org-billing`` entry point. With ``--freeze-after N`` it prints ``FROZEN <N>`` once N orgs
are done; with ``--freeze-at 'PATCH /api/v1/...'`` it prints ``FROZEN <METHOD PATH>`` when it is about to send that
request (not sent). Either way it then blocks the event loop (other orgs stay half-way through their steps) until
the parent kills it with SIGKILL.
"""

from __future__ import annotations

import sys
import threading

import httpx

from lago_org_billing import _migration_cli
from lago_org_billing._migration import OrgResult
from lago_org_billing.cli import main


def freeze_after(limit: int) -> None:
    def hook(result: OrgResult, done: int, total: int) -> None:
        if done >= limit:
            print(f"FROZEN {done}", flush=True)
            threading.Event().wait()  # never set: the parent kills this process

    _migration_cli.ORG_DONE_HOOK = hook


def freeze_at(request_line: str) -> None:
    method, _, path = request_line.partition(" ")
    send = httpx.AsyncHTTPTransport.handle_async_request

    async def handle(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        if request.method == method and request.url.path == path:
            print(f"FROZEN {request_line}", flush=True)
            threading.Event().wait()  # never set: the parent kills this process
        return await send(self, request)

    httpx.AsyncHTTPTransport.handle_async_request = handle  # type: ignore[method-assign]


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--freeze-after"]:
        freeze_after(int(argv[1]))
        argv = argv[2:]
    elif argv[:1] == ["--freeze-at"]:
        freeze_at(argv[1])
        argv = argv[2:]
    sys.exit(main(argv))
