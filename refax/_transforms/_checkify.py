"""``nnx.checkify``: lifted ``jax.experimental.checkify.checkify``.

The checked function is the lifting core's pure function (``_lift.make_pure``), so objects'
state updates propagate out as for any other transform; the error value is checkify's own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from jax.experimental import checkify as checkify_lib

from refax._transforms._checks import check_not_bound_method
from refax._transforms._lift import apply_outputs, make_pure, split_inputs

__all__ = ["checkify"]

A = TypeVar("A")


def checkify(
    f: Callable[..., A],
    errors: frozenset[Any] = checkify_lib.user_checks,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Callable[..., tuple[Any, A]]:
    """Lifted ``jax.experimental.checkify.checkify``: ``(error, output)`` instead of raising.

    The checked function runs once; objects among its arguments are rebuilt inside and every
    update it makes to them (new Variable values and structural changes) propagates back to
    the caller's objects, whether a check failed or not. ``err.throw()`` raises the first
    failed check, if any.

    Args:
      f: the function to check; may take and return objects.
      errors: the set of checks to enable (``checkify.user_checks`` by default, i.e.
        ``checkify.check`` calls; also ``checkify.float_checks``, ``index_checks``, ...).
      graph: ``False`` selects tree mode: objects are pytrees, and an object or Variable
        reachable twice among the arguments is an error. ``None`` reads the default.
      graph_updates: ``False`` propagates only the values of the arguments' Variables, not
        structural changes. ``None`` reads the default.

    Returns:
      A function returning ``(err, out)``; ``err.get()`` is ``None`` when every check passed.

    Example:
      >>> import jax.numpy as jnp
      >>> from jax.experimental import checkify
      >>> from refax import nnx
      >>> def f(v):
      ...   checkify.check(v.value > 0, 'v must be positive, got {}', v.value)
      ...   return jnp.log(v.value)
      >>> err, out = nnx.checkify(f)(nnx.Param(jnp.array(-1.0)))
      >>> err.get()
      'v must be positive, got -1.0 (`check` failed)'
    """
    check_not_bound_method(f, "checkify")
    checked = checkify_lib.checkify(make_pure(lambda step: step.run(f)), errors=errors)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> tuple[Any, A]:
        inputs = split_inputs(args, kwargs, graph=graph, graph_updates=graph_updates)
        err, (info, values, out_other) = checked(inputs.static(), inputs.values, inputs.other)
        return err, apply_outputs(inputs, info.value, values, out_other)

    return wrapper
