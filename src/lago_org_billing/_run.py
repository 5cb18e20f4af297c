"""The commands' event loop: :func:`anyio.run`, with Ctrl-C a :class:`KeyboardInterrupt` on every Python."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

__all__ = ["run_main"]

T = TypeVar("T")


def run_main(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``anyio.run(func, *args)``. On Ctrl-C asyncio's runner cancels the command's task and raises
    :class:`KeyboardInterrupt`; on Python 3.10 (anyio's backport of the runner, without ``Task.uncancel``) the
    :class:`asyncio.CancelledError` came out instead, a traceback where the commands say "Interrupted" and exit 130.
    From 3.11 a cancellation coming out is not a Ctrl-C: raised as it is."""
    try:
        return anyio.run(func, *args)
    except asyncio.CancelledError:
        if sys.version_info >= (3, 11):
            raise
        raise KeyboardInterrupt from None
