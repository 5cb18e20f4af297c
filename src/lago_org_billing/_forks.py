"""What a process forked from another must not use of its parent's (a kept-alive socket, a connection pool, a SQLite
connection and its slot lock): each object holding such things registers here (:func:`track`), and its ``_forked()``
runs in the child right after the fork (``os.register_at_fork``; objects tracked weakly: none kept alive by this).
What the parent's objects held is then kept referenced in the child (:data:`left_by_parent`), never used nor closed
there: closing it could act on the parent's connection (a TLS close, a SQLite rollback)."""

from __future__ import annotations

import os
import weakref
from typing import Any, Protocol

__all__ = ["left_by_parent", "track"]


class _Forkable(Protocol):
    def _forked(self) -> None: ...


_tracked: weakref.WeakSet[Any] = weakref.WeakSet()
#: In a forked child, what its parent's objects held: referenced for the child's life, never closed.
left_by_parent: list[Any] = []


def track(obj: _Forkable) -> None:
    """Have ``obj._forked()`` run in every child forked from this process from now on, while ``obj`` lives."""
    _tracked.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_tracked):
        obj._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
