"""Lifting any JAX transform by hand: ``split_inputs`` / ``merge_inputs``.

The two decorators sandwich a plain JAX transform so that it accepts refax objects and
propagates their changes, the way the lifted transforms do, without a dedicated wrapper::

    @split_inputs          # outside: objects -> pure trees, and changes back afterwards
    @jax.jit               # any JAX transform over pure pytrees
    @merge_inputs          # inside: pure trees -> objects, and the objects' state out again
    def forward(model, x):
        return model(x)

``merge_inputs`` makes the inner function return ``(args, out)``: the (possibly updated)
argument objects as pure trees, then its own output. So a transform that takes output axes
(``jax.vmap``) gets ``out_axes=(in_axes, out_axes)``. Objects passed by keyword are rebuilt
inside but only those among the positional arguments are propagated out.

Both use one :func:`refax.update_context` (named ``ctxtag``) around the four split/merge steps
(see ``refax/_graph/_context.py``), so shared objects stay shared and objects added inside
appear outside. Calls nest: an inner pair opens its own context under the same tag.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from refax._graph._context import update_context
from refax._transforms._extract import clear_non_graph_nodes, from_tree, to_tree

__all__ = ["split_inputs", "merge_inputs"]

F = TypeVar("F", bound=Callable[..., Any])
_DEFAULT_TAG = "split_merge_inputs"
_MISSING: Any = object()


def split_inputs(f: F = _MISSING, *, ctxtag: Hashable = _DEFAULT_TAG) -> Any:
    """The outer half of a hand-lifted transform (see the module docs).

    Turns the objects among the arguments into pure trees (:func:`refax.to_tree`), calls ``f``
    (a JAX transform of a :func:`merge_inputs` function) with them, and merges the
    ``(args, out)`` it returns back: the caller's objects are updated in place and ``out`` is
    returned with its objects rebuilt.

    Args:
      f: the transformed function; omit it to use ``split_inputs(ctxtag=...)`` as a decorator.
      ctxtag: the update context's tag; the matching :func:`merge_inputs` must use the same.

    Returns:
      The lifted function, taking and returning objects (or a decorator when ``f`` is
      omitted). After each call the argument objects hold the state ``f`` left in them.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from refax import nnx
      >>> from refax.nnx.transforms import general
      >>> counter = nnx.Dict(n=nnx.BatchStat(jnp.array(0)))
      >>> @general.split_inputs
      ... @jax.jit
      ... @general.merge_inputs
      ... def bump(counter):
      ...   counter.n[...] += 1
      >>> bump(counter); bump(counter)
      >>> int(counter.n[...])
      2
    """
    if f is _MISSING:
        return functools.partial(split_inputs, ctxtag=ctxtag)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with update_context(ctxtag):
            pure_args, pure_kwargs = to_tree((args, kwargs), ctxtag=ctxtag)
            result = f(*pure_args, **pure_kwargs)
            if not (isinstance(result, tuple) and len(result) == 2):
                raise TypeError(
                    f"split_inputs expected the transformed function {getattr(f, '__name__', f)!r}"
                    " to return (args, out), as a function decorated with merge_inputs does; "
                    f"got {type(result).__name__}. Decorate the innermost function with "
                    "merge_inputs."
                )
            _, out = from_tree(result, ctxtag=ctxtag, is_inner=False)
        return out

    return wrapper


def merge_inputs(f: F = _MISSING, *, ctxtag: Hashable = _DEFAULT_TAG) -> Any:
    """The inner half of a hand-lifted transform (see the module docs).

    Rebuilds the objects from the pure trees it receives (:func:`refax.from_tree`), calls ``f``
    with them, and returns ``(args, out)`` as pure trees: the positional argument objects
    (other argument leaves replaced by None) and ``f``'s output.

    Args:
      f: the user function; omit it to use ``merge_inputs(ctxtag=...)`` as a decorator.
      ctxtag: the update context's tag; the matching :func:`split_inputs` must use the same.

    Returns:
      The inner function: it takes pure trees and returns ``(args, out)`` as pure trees (or
      a decorator when ``f`` is omitted).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from refax import nnx
      >>> from refax.nnx.transforms import general
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> forward = general.split_inputs(jax.jit(general.merge_inputs(lambda m, x: m(x))))
      >>> forward(model, jnp.ones((1, 2))).shape
      (1, 3)
    """
    if f is _MISSING:
        return functools.partial(merge_inputs, ctxtag=ctxtag)

    @functools.wraps(f)
    def wrapper(*pure_args: Any, **pure_kwargs: Any) -> tuple[Any, Any]:
        args, kwargs = from_tree((pure_args, pure_kwargs), ctxtag=ctxtag, is_inner=True)
        out = f(*args, **kwargs)
        return to_tree((clear_non_graph_nodes(args), out), ctxtag=ctxtag)

    return wrapper
