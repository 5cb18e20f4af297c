"""Checks of the arguments of the public API, made once when an object is built (never on the request path).

Each raises a :class:`ConfigurationError` naming the argument (or its environment variable) and saying what to give:
a wrong value refused where it was written, not an ``AttributeError`` deep inside at the first request, nor a value
that quietly means something else (``"false"``, a non-empty string, is true; ``True`` is the number 1).
"""

from __future__ import annotations

import inspect
import math
import numbers
import sys
from typing import Any

from ._errors import ConfigurationError
from ._settings import BillingSettings


def number(
    name: str, value: object, *, minimum: float = 0.0, inclusive: bool = False, variable: str | None = None
) -> float:
    """``value``, a finite real number (an int, a float, numpy's) above ``minimum`` (or equal to it with
    ``inclusive``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not _finite(value)
        or value < minimum
        or (value == minimum and not inclusive)
    ):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        hint = " (a string read from the environment: convert it with float())" if isinstance(value, str) else ""
        if type(value).__name__ == "Decimal":
            hint = " (a Decimal: convert it with float())"
        elif isinstance(value, numbers.Real) and _overflows(value):
            hint = " (past the largest float, 1.8e308)"
        raise ConfigurationError(
            f"{name} must be a finite number of seconds {bound}, got {_shown(value)}{hint}.", variable=variable
        )
    return float(value)


def _overflows(value: numbers.Real) -> bool:
    """Whether ``value`` (an int past the floats: ``10**400``) cannot be a float."""
    try:
        float(value)
    except OverflowError:
        return True
    return False


def _finite(value: numbers.Real) -> bool:
    """``math.isfinite``, false for an int past the floats (``10**400``), which it raises ``OverflowError`` for
    (``float()`` does too, where the value is used)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _shown(value: object) -> str:
    """``repr(value)`` for a message; an int of more than 4,300 digits (which Python refuses to print: ``ValueError``)
    by its size."""
    try:
        return repr(value)
    except ValueError:
        if isinstance(value, numbers.Integral):
            return f"an int of {int(value).bit_length()} bits"
        return f"a {type(value).__name__}"


def timeout(name: str, value: object) -> float | None:
    """``value``, ``None`` (no limit, or the default) or a number of seconds >= 0 (``math.inf``: no limit), for a
    timeout given to a call of the public API (``EventPipeline.flush(timeout)``): a string failed deep inside anyio
    (``TypeError``), NaN never ended or ended at once (every comparison false), a negative one at once. An int past
    the floats (``10**400``) is no limit too."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or _nan(value) or value < 0:
        hint = " (a string read from the environment: convert it with float())" if isinstance(value, str) else ""
        raise ConfigurationError(
            f"{name} must be None or a number of seconds >= 0 (math.inf: no limit), got {_shown(value)}{hint}."
        )
    if _overflows(value):  # (``10**400`` seconds: no limit, as math.inf; ``float()`` raised ``OverflowError``)
        return math.inf
    return float(value)


def _nan(value: numbers.Real) -> bool:
    """``math.isnan``, false for an int past the floats (which it raises ``OverflowError`` for)."""
    try:
        return math.isnan(value)
    except OverflowError:  # (an int past the floats: a number all the same)
        return False


def whole(
    name: str, value: object, *, minimum: int = 1, maximum: int | None = None, variable: str | None = None
) -> int:
    """``value``, a whole number (an int, numpy's; not a bool) from ``minimum`` to ``maximum``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or int(value) < minimum
        or (maximum is not None and int(value) > maximum)
    ):
        bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
        hint = " (a string read from the environment: convert it with int())" if isinstance(value, str) else ""
        raise ConfigurationError(
            f"{name} must be a whole number {bound}, got {_shown(value)}{hint}.", variable=variable
        )
    return int(value)


def flag(name: str, value: object, *, variable: str | None = None) -> bool:
    """``value``, a bool (``"false"``, a non-empty string, would be true)."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, got {value!r}.", variable=variable)
    return value


def text(name: str, value: object, *, example: str, empty: bool = False, variable: str | None = None) -> str:
    """``value``, a str (non-empty unless ``empty``)."""
    if not isinstance(value, str) or (not empty and not value.strip()):
        shown = f"a {type(value).__name__}" if not isinstance(value, str) else repr(value)
        hint = " (decode bytes with .decode())" if isinstance(value, (bytes, bytearray)) else ""
        raise ConfigurationError(
            f"{name} must be {'a' if empty else 'a non-empty'} string such as {example!r}, got {shown}{hint}.",
            variable=variable,
        )
    return value


def function(
    name: str,
    value: Any,
    *,
    what: str,
    arguments: int | None = None,
    keywords: tuple[str, ...] = (),
    synchronous: bool = False,
) -> Any:
    """``value``, a callable; not one of this package's resolver makers (``from_header``, ``from_state``...) given
    uncalled, which made no resolver but was called as one, with the scope, at every request (each request then
    unresolved: served unbilled). With ``arguments``, one that can be called with that many positional arguments (and
    ``keywords``), as it will be (a resolver ``lambda: ...``, a class given for its instance: a ``TypeError`` at every
    call, caught there and the request served unbilled, or the webhook answered 500 until Lago gives up); with
    ``synchronous``, a plain function, not an ``async`` one (its coroutine would never be awaited). A callable whose
    signature Python cannot tell (some builtins) is taken as it is, and a test double (:func:`double`) too."""
    if not callable(value):
        raise ConfigurationError(
            f"{name} must be {what}, got {_shown(value)} ({type(value).__name__}), which is not callable."
        )
    if double(value):
        return value
    maker = _resolver_maker(value)
    if maker is not None:
        raise ConfigurationError(
            f"{name} must be {what}, got {maker} itself, which makes a resolver: call it ({maker}(...)) and give "
            "what it returns."
        )
    if arguments is not None:
        problem = _call_problem(value, arguments, keywords)
        if problem is not None:
            given = f"the class {value.__name__} itself" if isinstance(value, type) else _shown(value)
            taken = ", ".join([f"{arguments} positional argument{'s' if arguments != 1 else ''}", *keywords])
            raise ConfigurationError(
                f"{name} must be {what}, got {given}, which cannot be called with {taken} ({problem})."
            )
    if synchronous and _is_async(value):
        raise ConfigurationError(f"{name} must be {what}, a plain function, got an async one: {_shown(value)}.")
    return value


#: The public functions that make resolvers (``from_header('X-Org-Id')``): given uncalled, each was called with the
#: request's scope as its argument (``from_state(scope)``) and raised at every request.
_RESOLVER_MAKERS = ("from_header", "from_state", "from_user", "from_jwt_claim", "first_of")


def _resolver_maker(value: object) -> str | None:
    """The name of the resolver maker ``value`` is, else ``None``."""
    identity = sys.modules.get("lago_org_billing._identity")
    if identity is None:  # (not imported yet: nobody could have given one)
        return None
    return next((maker for maker in _RESOLVER_MAKERS if getattr(identity, maker, None) is value), None)


def _call_problem(value: Any, arguments: int, keywords: tuple[str, ...]) -> str | None:
    """Why ``value`` cannot be called with ``arguments`` positional arguments and ``keywords`` (``None``: it can, or
    its signature cannot be told)."""
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # (a builtin or a C type without one: left to be called)
        return None
    try:
        signature.bind(*range(arguments), **dict.fromkeys(keywords))
    except TypeError as exc:
        return str(exc)
    return None


def _is_async(value: object) -> bool:
    """An ``async def`` function, or an object whose ``__call__`` is one."""
    call = getattr(value, "__call__", None)  # noqa: B004
    return inspect.iscoroutinefunction(value) or inspect.iscoroutinefunction(call)


def built(name: str, value: object, *, what: str) -> None:
    """Refuse a class given for an instance (``quota=QuotaGate``, ``pipeline=EventPipeline``): a class has every
    method its instances have, so checks for those methods pass it, and it failed at its first use (a method called
    unbound: a ``TypeError`` missing an argument)."""
    if isinstance(value, type):
        raise ConfigurationError(
            f"{name} must be {what}, got the class {value.__name__} itself: build one ({value.__name__}(...)) and "
            "give that."
        )


def double(value: object) -> bool:
    """Whether ``value`` is a ``unittest.mock`` test double (``AsyncMock()``, ``MagicMock()``, ``create_autospec``):
    accepted for any object, as before these checks, so that users' tests that stand one in for a client, a service or
    a middleware keep working (``unittest.mock`` is not imported for this: a process that has none has no double)."""
    module = sys.modules.get("unittest.mock")
    return module is not None and isinstance(value, module.NonCallableMock)


def instance(name: str, value: Any, cls: type, *, what: str) -> Any:
    """``value``, an instance of ``cls`` (or a test double: :func:`double`)."""
    if not isinstance(value, cls) and not double(value):
        raise ConfigurationError(f"{name} must be {what}, got {type(value).__name__}.")
    return value


def client(name: str, value: object) -> None:
    """Refuse what is not a Lago client: an object whose ``settings`` are a :class:`BillingSettings` (a
    ``LagoClient``, a subclass, a stand-in of one) or a test double (:func:`double`)."""
    if not isinstance(getattr(value, "settings", None), BillingSettings) and not double(value):
        raise ConfigurationError(f"{name} must be a LagoClient, got {type(value).__name__}.")
