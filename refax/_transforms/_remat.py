"""``nnx.remat`` (alias ``nnx.checkpoint``): lifted ``jax.checkpoint``.

The checkpointed function is the lifting core's pure function (``_lift.make_pure``): objects
in the arguments are rebuilt inside, and their state updates propagate out as for any other
transform; only the recomputation of activations in the backward pass is ``remat``'s own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import jax

from refax._transforms._checks import check_not_bound_method
from refax._transforms._lift import Step, apply_outputs, make_pure, split_inputs
from refax._transforms._static_args import as_tuple, extract_static, insert_static

__all__ = ["remat", "checkpoint"]

F = TypeVar("F", bound=Callable[..., Any])


def remat(
    f: F | None = None,
    *,
    prevent_cse: bool = True,
    static_argnums: int | tuple[int, ...] = (),
    policy: Callable[..., bool] | None = None,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Lifted ``jax.checkpoint``: recompute ``f``'s activations in the backward pass.

    Usable as ``@nnx.remat``, ``@nnx.remat(policy=...)`` or ``nnx.remat(f, ...)``, also on
    methods in a class body. Objects in the arguments are rebuilt inside the checkpointed
    function and their state updates propagate out; values and gradients are the same as
    without ``remat``.

    Args:
      f: the function to checkpoint.
      prevent_cse: passed to ``jax.checkpoint``.
      static_argnums: positional arguments treated as static Python values (must be hashable).
      policy: a ``jax.checkpoint_policies`` policy saying which intermediates may be saved.
      graph: ``False`` selects tree mode: objects are pytrees, and an object or Variable
        reachable twice among the arguments is an error. ``None`` reads the default.
      graph_updates: ``False`` propagates only the values of the arguments' Variables, not
        structural changes (new or deleted attributes). ``None`` reads the default.

    Returns:
      The checkpointed function (or a decorator when ``f`` is omitted).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> class Block(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.linear = nnx.Linear(2, 2, rngs=rngs)
      ...   @nnx.remat
      ...   def __call__(self, x):
      ...     return jnp.tanh(self.linear(x))
      >>> block = Block(nnx.Rngs(0))
      >>> grads = nnx.grad(lambda m, x: m(x).sum())(block, jnp.ones((1, 2)))
      >>> grads['linear']['kernel'].value.shape
      (2, 2)
    """
    if f is None:
        return functools.partial(
            remat,
            prevent_cse=prevent_cse,
            static_argnums=static_argnums,
            policy=policy,
            graph=graph,
            graph_updates=graph_updates,
        )
    check_not_bound_method(f, "remat")
    argnums = as_tuple(static_argnums)

    def call(step: Step) -> Any:
        args, kwargs = insert_static(step.args, step.kwargs, step.settings)
        return f(*args, **kwargs)

    checkpointed = jax.checkpoint(make_pure(call), prevent_cse=prevent_cse, policy=policy)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args, kwargs, static_args = extract_static(args, kwargs, argnums, (), "remat")
        inputs = split_inputs(args, kwargs, graph=graph, graph_updates=graph_updates)
        info, values, out_other = checkpointed(
            inputs.static(static_args), inputs.values, inputs.other
        )
        return apply_outputs(inputs, info.value, values, out_other)

    return wrapper


checkpoint = remat
