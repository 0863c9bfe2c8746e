"""Checks of layer constructor arguments, shared by the layers of :mod:`refax.nn` (private).

Every check raises in the style of :mod:`refax.errors`: the verdict naming the layer and the
argument, then the offending value, then (when given) how to fix it. A value of the wrong type
raises ``TypeError``, a value out of range ``ValueError``.

Integers are Python and NumPy integers and concrete 0-d integer arrays; ``bool`` is not an
integer here. The checks never convert a traced value (under a JAX transform) to a Python
number: a traced size is rejected as the wrong type (sizes must be static), and a traced rate
or epsilon is accepted unchecked.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

import jax
import numpy as np

__all__ = [
    "is_int",
    "positive_int",
    "nonnegative_int",
    "positive_ints",
    "nonnegative_float",
    "fraction",
]


def is_int(value: Any) -> bool:
    """True for integers (not bools), including concrete 0-d integer arrays."""
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return (
        isinstance(value, np.ndarray | jax.Array)
        and not isinstance(value, jax.core.Tracer)
        and value.ndim == 0
        and np.issubdtype(value.dtype, np.integer)
    )


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray | np.generic | jax.Array)


def _fail(
    error: type[Exception], layer: str, name: str, requirement: str, value: Any, fix: str
) -> NoReturn:
    if isinstance(value, jax.core.Tracer):
        shown = "a traced value (sizes must be static Python ints, not JAX-traced values)"
    elif error is TypeError:
        shown = f"{value!r} of type {type(value).__name__}"
    elif _is_real(value) or is_int(value):
        shown = str(value)
    else:
        shown = repr(value)
    message = f"{layer}: {name} must be {requirement}, got {shown}."
    raise error(f"{message} {fix}" if fix else message)


def _int_at_least(layer: str, name: str, value: Any, minimum: int, what: str, fix: str) -> None:
    if not is_int(value):
        _fail(TypeError, layer, name, what, value, fix)
    if int(value) < minimum:
        _fail(ValueError, layer, name, what, value, fix)


def positive_int(
    layer: str, name: str, value: Any, fix: str = "", *, optional: bool = False
) -> None:
    """Checks that ``value`` is an integer >= 1 (or None when ``optional``)."""
    if optional and value is None:
        return
    what = "a positive integer" + (" or None" if optional else "")
    _int_at_least(layer, name, value, 1, what, fix)


def nonnegative_int(layer: str, name: str, value: Any, fix: str = "") -> None:
    """Checks that ``value`` is an integer >= 0."""
    _int_at_least(layer, name, value, 0, "a non-negative integer", fix)


def positive_ints(
    layer: str,
    name: str,
    value: Any,
    fix: str = "",
    *,
    allow_int: bool = True,
    allow_none: bool = False,
    length: int | None = None,
    per: str = "",
) -> tuple[int, ...] | None:
    """Checks a shape-like argument: a sequence of integers >= 1 (or one such integer).

    Args:
      layer: the layer's name, for the message.
      name: the argument's name, for the message.
      value: the argument.
      fix: how to fix a bad value, appended to the message.
      allow_int: whether a single integer is accepted (and broadcast to ``length``).
      allow_none: whether ``None`` is accepted (returned as is).
      length: the required number of entries, if any.
      per: what the entries stand for, for the message (e.g. ``"one per spatial dim"``).

    Returns:
      The entries as a tuple (a single integer repeated ``length`` times, or once), or None.
    """
    if allow_none and value is None:
        return None
    count = "" if length is None else f"{length} "
    what = f"a sequence of {count}positive integers" + (f" ({per})" if per else "")
    if allow_int:
        what = f"a positive integer or {what}"
    if allow_none:
        what += " or None"
    if allow_int and is_int(value):
        _int_at_least(layer, name, value, 1, what, fix)
        return (value,) * (1 if length is None else length)
    if not isinstance(value, Iterable) or isinstance(value, str | bytes | Mapping):
        _fail(TypeError, layer, name, what, value, fix)
    entries = tuple(value)
    if not all(is_int(v) for v in entries):
        _fail(TypeError, layer, name, what, value, fix)
    if any(int(v) < 1 for v in entries) or (length is not None and len(entries) != length):
        _fail(ValueError, layer, name, what, value, fix)
    return entries


def _real_in(layer: str, name: str, value: Any, what: str, fix: str, inside: Any) -> None:
    if _is_real(value):
        if not inside(value):
            _fail(ValueError, layer, name, what, value, fix)
    elif not _is_array(value):  # arrays (possibly traced) are accepted unchecked
        _fail(TypeError, layer, name, what, value, fix)


def nonnegative_float(layer: str, name: str, value: Any, fix: str = "") -> None:
    """Checks that ``value`` is a real number >= 0 (NaN is rejected)."""
    _real_in(layer, name, value, "a non-negative number", fix, lambda v: v >= 0)


def fraction(
    layer: str, name: str, value: Any, fix: str = "", *, include_one: bool = False
) -> None:
    """Checks that ``value`` is a real number in ``[0, 1)`` (``[0, 1]`` with ``include_one``)."""
    if include_one:
        _real_in(layer, name, value, "in [0, 1]", fix, lambda v: 0 <= v <= 1)
    else:
        _real_in(layer, name, value, "in [0, 1)", fix, lambda v: 0 <= v < 1)
