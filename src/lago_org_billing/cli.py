"""The ``lago-org-billing`` command: ``emulator``, ``health``, ``demo``, ``migrate``, ``dead-letters``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

import anyio

from ._errors import LagoIntegrationError

__all__ = ["main"]

DEFAULT_EMULATOR_KEY = "lago-emulator-key"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lago-org-billing`` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        code: int = args.handler(args)
    except LagoIntegrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (``| head``): no traceback, and none at exit flushing stdout
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lago-org-billing", description="Per-organization usage billing through Lago."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is being done")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    emulator = commands.add_parser("emulator", help="serve the Lago emulator (Lago's REST API, in memory)")
    emulator.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    emulator.add_argument("--port", type=int, default=3000, help="port (default 3000, Lago's)")
    emulator.add_argument(
        "--api-key",
        default=None,
        help=f"API key clients must send (default: $LAGO_API_KEY, else {DEFAULT_EMULATOR_KEY!r})",
    )
    emulator.add_argument(
        "--event-store",
        choices=("postgres", "clickhouse"),
        default="postgres",
        help="duplicate transaction_id handling: postgres answers 422, clickhouse replaces (default postgres)",
    )
    emulator.add_argument(
        "--seed", metavar="FILE", help="JSON file of billable_metrics, plans, customers... to preload"
    )
    emulator.set_defaults(handler=_emulator)

    health = commands.add_parser("health", help="check the Lago configured by LAGO_API_URL / LAGO_API_KEY")
    health.add_argument("--json", action="store_true", help="print the result as JSON")
    health.set_defaults(handler=_health)

    demo = commands.add_parser("demo", help="run the end-to-end demo against an embedded Lago emulator")
    demo.add_argument("--serve", action="store_true", help="keep the emulator and the example app running")
    demo.add_argument("--port", type=int, default=0, help="port of the emulator (default: a free one)")
    demo.set_defaults(handler=_demo)

    from ._dead_letters import add_dead_letters_command
    from ._migration_cli import add_migrate_command

    add_migrate_command(commands)
    add_dead_letters_command(commands)
    return parser


def _emulator(args: argparse.Namespace) -> int:
    from .testing import FakeLago
    from .testing._server import free_port_or_error, require_uvicorn, run

    api_key = args.api_key or os.environ.get("LAGO_API_KEY") or DEFAULT_EMULATOR_KEY
    if args.seed:
        fake = FakeLago.from_seed_file(args.seed, api_key=api_key, event_store=args.event_store)
    else:
        fake = FakeLago(api_key=api_key, event_store=args.event_store)
    require_uvicorn()  # before saying where it listens: a script reading the address must not wait on nothing
    port = free_port_or_error(args.host, args.port)  # before saying where it listens (a port in use: one line)
    host = f"[{args.host}]" if ":" in args.host else args.host
    # The environment's key may be a real Lago's: not printed (the apps of this shell already have it).
    key = "" if api_key == os.environ.get("LAGO_API_KEY") else f" LAGO_API_KEY={api_key}"
    print(
        f"Lago emulator on http://{host}:{port} (event store {args.event_store}"
        f"{', taking the LAGO_API_KEY of your environment' if not key else ''}).\n"
        f"  export LAGO_API_URL=http://{host}:{port}{key}",
        flush=True,
    )
    run(fake, args.host, port)
    return 0


def _health(args: argparse.Namespace) -> int:
    from ._billing import OrgBilling
    from ._settings import BillingSettings

    settings = BillingSettings.from_env()

    async def check() -> dict[str, object]:
        async with OrgBilling(settings) as billing:
            return await billing.check_lago_health()

    result = anyio.run(check)
    if args.json:
        print(json.dumps(result))
    elif result["healthy"]:
        print(f"Lago at {result['url']} is healthy (version {result['version']}, {result['latency_ms']} ms).")
    else:
        print(f"Lago at {result['url']} is NOT healthy: {result['error']}", file=sys.stderr)
    return 0 if result["healthy"] else 1


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(serve=args.serve, port=args.port)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
