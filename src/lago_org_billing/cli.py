"""The ``lago-org-billing`` command: ``emulator``, ``health``, ``demo``, ``migrate``, ``dead-letters``."""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .testing import FakeLago

# Only the standard library here (json and logging are imported when used): ``--help`` and a mistyped command then
# cost next to nothing, and a Ctrl-C while a command imports what it needs is in ``main`` (exit 130, no traceback).

__all__ = ["main"]

DEFAULT_EMULATOR_KEY = "lago-emulator-key"

_ENVIRONMENT = """\
environment (also read from ./.env; all optional unless marked):
  LAGO_API_URL           URL without /api/v1 (default http://localhost:3000)
  LAGO_API_KEY           Lago API key (required to talk to Lago)
  LAGO_API_TIMEOUT       seconds per Lago call (default 10)
  LAGO_EVENT_CODE        metric code of each request's event (default api_call)
  LAGO_SUBSCRIPTION_ID_TEMPLATE  subscription external_id (default {org_id})
  LAGO_ORG_HEADER        opt-in: request header naming the org (e.g. X-Org-Id)
  LAGO_USER_HEADER       opt-in: request header naming the user (e.g. X-User-Id)
  LAGO_EXCLUDE_PATHS     comma-separated path prefixes never billed or gated
  LAGO_SPOOL_PATH        SQLite file of the event spool (default: in memory)
  LAGO_REDIS_URL         Redis for shared quota counters and webhook dedupe
  LAGO_QUOTA_MODE        enforce, monitor or off (default enforce)
  LAGO_FAIL_OPEN         allow requests when Lago cannot be asked (default true)
  LAGO_USAGE_CACHE_TTL   seconds a usage snapshot is trusted (default 30)
  LAGO_PLAN_LIMITS       JSON fallback limits per plan code, e.g.
                         {"free": {"max_api_calls": 300, "max_tokens": 100000}}
  LAGO_WEBHOOK_HMAC_KEY  HMAC key of Lago webhooks (default: JWT mode)
See the README (Configuration) for the others (LAGO_MAX_RETRIES,
LAGO_RETRY_DEADLINE, LAGO_QUOTA_*...)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lago-org-billing`` command; returns the exit code."""
    given = list(sys.argv[1:] if argv is None else argv)
    try:  # the parser imports the module of the command given: a Ctrl-C then is an interrupted run, not a traceback
        parser = _parser(given)
        args, unknown = parser.parse_known_args(given)
    except KeyboardInterrupt:
        return 130
    if unknown:  # those given after a command: said with that command's usage (argparse's says the top-level one)
        command = getattr(args, "command", None)
        after = given[given.index(command) + 1 :] if command in given else []
        owner = _command_parser(parser, command) if all(token in after for token in unknown) else parser
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:  # what every command imports anyway (starlette, anyio...): under the Ctrl-C of the run
        import json
        import logging

        from ._errors import LagoIntegrationError, LagoRateLimitError, LagoUnavailableError
    except KeyboardInterrupt:
        return 130
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        code: int = args.handler(args)
    except LagoIntegrationError as exc:
        # Lago down or throttling (after the client's retries) is a run that stopped: exit 1, run again later. Exit 2
        # is what the operator must fix first: settings, the mapping, the spool, a key Lago refuses.
        code = 1 if isinstance(exc, (LagoUnavailableError, LagoRateLimitError)) else 2
        print(f"error: {exc}", file=sys.stderr)
        if getattr(args, "json", False) and not getattr(args, "json_started", False):
            # --json: stdout stays one JSON document a script can read (health's keeps its "healthy" key)
            failed: dict[str, object] = {"healthy": False} if args.command == "health" else {}
            print(json.dumps({**failed, "error": str(exc), "exit_code": code}))
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (``| head``): no traceback, and none at exit flushing stdout
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


#: The commands defined in modules of their own (imported by the parser only when given): name -> module, function
#: adding the command to the subparsers, and the help line the top-level ``--help`` shows (the one the function gives:
#: a test keeps them equal).
_COMMANDS_ELSEWHERE = {
    "migrate": (
        "._migration_cli",
        "add_migrate_command",
        "move billing from user-keyed Lago customers to org-keyed ones (dry run by default)",
    ),
    "dead-letters": (
        "._dead_letters",
        "add_dead_letters_command",
        "list the dead letters of the event spool, send them to Lago again (--replay) or delete them (--purge)",
    ),
}


def _parser(given: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The parser of the command line; of the commands defined elsewhere, only those named in ``given`` (a word of the
    command line equal to the command's name: argparse picks a command by no other) get their full parser, importing
    their module (the others are a help line). ``None``: all of them."""
    parser = argparse.ArgumentParser(
        prog="lago-org-billing",
        description="Per-organization usage billing through Lago.",
        epilog=_ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is being done")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    emulator = commands.add_parser(
        "emulator",
        help="serve the Lago emulator (Lago's REST API, in memory)",
        epilog="Exit codes: 130 stopped with Ctrl-C (it serves until stopped); 2 a seed file that cannot be read or "
        "holds what Lago would refuse, a port taken or out of range, a host that is not this machine's, or uvicorn "
        "missing (said on stderr, before serving).",
    )
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

    health = commands.add_parser(
        "health",
        help="check the Lago configured by LAGO_API_URL / LAGO_API_KEY",
        description="Check that the Lago of LAGO_API_URL answers (GET /health) and takes LAGO_API_KEY (one "
        "authenticated call), each call made once within LAGO_API_TIMEOUT seconds (a probe: Lago as it is now). "
        "The variables come from the environment, else from ./.env.",
        epilog="Exit codes: 0 healthy (a warning on stderr when LAGO_EVENT_CODE is the code of no billable metric "
        "there: Lago takes such events and bills none); 1 not healthy (Lago unreachable, not Lago's API, or refusing "
        "the key: said on stderr); 2 settings missing or malformed (LAGO_API_KEY unset...).",
    )
    health.add_argument(
        "--json",
        action="store_true",
        help='print the result as JSON (a settings error too: {"healthy": false, "error": ..., "exit_code": 2})',
    )
    health.set_defaults(handler=_health)

    demo = commands.add_parser(
        "demo",
        help="run the end-to-end demo against an embedded Lago emulator",
        description="Start a Lago emulator and an example LLM-style API behind OrgBillingMiddleware on 127.0.0.1, "
        "send traffic for two orgs, and print what was served next to what Lago ingested; then show the quota "
        "blocking an org on a free plan and a plan upgrade unblocking it. The demo uses its own emulator and "
        "settings: the LAGO_* variables of the environment (and .env) are not read. Exit 0 when everything "
        "agrees (with --serve, also once stopped by Ctrl-C or SIGTERM), 1 on a mismatch, 2 when --port is taken, "
        "130 when interrupted before serving.",
    )
    demo.add_argument("--serve", action="store_true", help="keep the emulator and the example app running")
    demo.add_argument("--port", type=int, default=0, help="port of the emulator (default: a free one)")
    demo.set_defaults(handler=_demo)

    for name, (module, add_command, help_line) in _COMMANDS_ELSEWHERE.items():
        if given is None or name in given:
            getattr(importlib.import_module(module, __package__), add_command)(commands)
        else:
            commands.add_parser(name, help=help_line, add_help=False)
    return parser


def _command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of ``command`` (the top-level one when there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            chosen: argparse.ArgumentParser = action.choices[command]
            return chosen
    return parser


def _emulator(args: argparse.Namespace) -> int:
    from ._errors import ConfigurationError
    from ._settings import api_key_problem
    from .testing import FakeLago
    from .testing._server import free_port_or_error, local_url, require_uvicorn, run

    # (the environment's, else ./.env's, as the other commands and the app read it: an emulator started from the app's
    # directory takes the key the app sends)
    from_env = os.environ.get("LAGO_API_KEY") or _dotenv_key()
    given = args.api_key or from_env or DEFAULT_EMULATOR_KEY
    api_key = given.strip()  # (as the clients send it)
    problem = api_key_problem(api_key) if api_key else "is empty"
    if problem:  # (served, every call would be a 401: no client can send it)
        where = "--api-key" if args.api_key else "LAGO_API_KEY"
        raise ConfigurationError(f"The emulator's API key ({where}) {problem}.", variable="LAGO_API_KEY")
    if args.seed is not None:  # (an empty name too: refused, not an emulator started without its seed)
        fake = _seeded(args.seed, api_key=api_key, event_store=args.event_store)
    else:
        fake = FakeLago(api_key=api_key, event_store=args.event_store)
    require_uvicorn()  # before saying where it listens: a script reading the address must not wait on nothing
    _check_host(args.host)
    port = free_port_or_error(args.host, args.port)  # before saying where it listens (a port in use: one line)
    # (the URL run() signs its JWT webhooks with: the wildcard address, printed, had apps refuse every webhook's issuer)
    url = local_url(args.host, port)
    # The environment's key may be a real Lago's: not printed (the apps of this shell already have it).
    # (quoted for a shell: a key with a $, ; or quote, pasted unquoted, set another key)
    key = "" if given == from_env else f" LAGO_API_KEY={shlex.quote(api_key)}"
    print(
        f"Lago emulator on {url} (event store {args.event_store}"
        f"{', taking the LAGO_API_KEY of your environment' if not key else ''}).\n"
        f"  export LAGO_API_URL={shlex.quote(url)}{key}",
        flush=True,
    )
    run(fake, args.host, port)
    return 0


def _dotenv_key() -> str:
    """``LAGO_API_KEY`` of ``./.env`` (empty when there is none, or it cannot be read: the settings say why)."""
    from ._errors import ConfigurationError
    from ._settings import _read_env_file

    if not os.path.isfile(".env"):
        return ""
    try:
        return str(_read_env_file(".env").get("LAGO_API_KEY") or "")
    except (ConfigurationError, OSError, UnicodeDecodeError):
        return ""


def _seeded(path: str, **options: Any) -> FakeLago:
    """``FakeLago.from_seed_file(path, **options)``, with what it raises besides its own errors (text of another
    encoding than UTF-8; any Python error a seeding helper lets through, a safety net: they check their values) as a
    :class:`ConfigurationError` naming the file: one line, exit 2, not a traceback."""
    from ._errors import ConfigurationError, LagoIntegrationError
    from .testing import FakeLago

    try:
        return FakeLago.from_seed_file(path, **options)
    except LagoIntegrationError:
        raise
    except UnicodeDecodeError as exc:
        raise ConfigurationError(
            f"the emulator seed file {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8."
        ) from None
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise ConfigurationError(
            f"seed file {path!r}: a value of the wrong type or out of range ({type(exc).__name__}: {exc})."
        ) from None


def _check_host(host: str) -> None:
    """Refuse a ``--host`` the socket module cannot even look up (a NUL; text IDNA cannot encode, such as the lone
    surrogates of bytes of another encoding): a TypeError there, and a socket left open."""
    from ._errors import ConfigurationError

    try:
        if "\x00" in host:
            raise UnicodeError
        if not host.isascii():
            host.encode("idna")
    except UnicodeError:
        raise ConfigurationError(
            f"--host {host!r} is no host name or address of this machine: use --host 127.0.0.1 (or 0.0.0.0 for every "
            "interface)."
        ) from None


def _health(args: argparse.Namespace) -> int:
    import json

    from ._billing import OrgBilling
    from ._run import run_main
    from ._settings import BillingSettings

    settings = BillingSettings.from_env()

    async def check() -> dict[str, object]:
        async with OrgBilling(settings) as billing:
            return await billing.check_lago_health()

    result = run_main(check)
    if args.json:
        print(json.dumps(result))
    elif result["healthy"]:
        print(f"Lago at {result['url']} is healthy (version {result['version']}, {result['latency_ms']} ms).")
        warnings = result.get("warnings")
        for warning in warnings if isinstance(warnings, list) else ():  # (healthy: what it will not bill as set)
            print(f"Warning: {warning}", file=sys.stderr)
    else:
        print(f"Lago at {result['url']} is NOT healthy: {result['error']}", file=sys.stderr)
    return 0 if result["healthy"] else 1


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(serve=args.serve, port=args.port)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
