"""The ``lago-org-billing migrate`` command (placeholder until the migration CLI lands)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_migrate_command"]


def add_migrate_command(commands: Any) -> None:
    """Register ``migrate`` on the CLI's subparsers."""
    migrate = commands.add_parser("migrate", help="move user-keyed Lago customers to org-keyed ones")
    migrate.add_argument("--mapping-file", required=True)
    migrate.set_defaults(handler=_not_ready)


def _not_ready(args: argparse.Namespace) -> int:
    raise SystemExit("migrate is not available yet")
