"""Checks of the arguments of the public API, made once when an object is built (never on the request path).

Each raises a :class:`ConfigurationError` naming the argument (or its environment variable) and saying what to give:
a wrong value refused where it was written, not an ``AttributeError`` deep inside at the first request, nor a value
that quietly means something else (``"false"``, a non-empty string, is true; ``True`` is the number 1).
"""

from __future__ import annotations

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
        or not math.isfinite(value)
        or value < minimum
        or (value == minimum and not inclusive)
    ):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        hint = " (a string read from the environment: convert it with float())" if isinstance(value, str) else ""
        if type(value).__name__ == "Decimal":
            hint = " (a Decimal: convert it with float())"
        raise ConfigurationError(
            f"{name} must be a finite number of seconds {bound}, got {value!r}{hint}.", variable=variable
        )
    return float(value)


def timeout(name: str, value: object) -> float | None:
    """``value``, ``None`` (no limit, or the default) or a number of seconds >= 0 (``math.inf``: no limit), for a
    timeout given to a call of the public API (``EventPipeline.flush(timeout)``): a string failed deep inside anyio
    (``TypeError``), NaN never ended or ended at once (every comparison false), a negative one at once."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value < 0:
        hint = " (a string read from the environment: convert it with float())" if isinstance(value, str) else ""
        raise ConfigurationError(
            f"{name} must be None or a number of seconds >= 0 (math.inf: no limit), got {value!r}{hint}."
        )
    return float(value)


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
        raise ConfigurationError(f"{name} must be a whole number {bound}, got {value!r}{hint}.", variable=variable)
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


def function(name: str, value: Any, *, what: str) -> Any:
    """``value``, a callable."""
    if not callable(value):
        raise ConfigurationError(
            f"{name} must be {what}, got {value!r} ({type(value).__name__}), which is not callable."
        )
    return value


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
