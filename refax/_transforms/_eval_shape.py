"""``nnx.eval_shape`` and ``nnx.make_jaxpr``: lifted abstract evaluation.

Both trace the user function on objects rebuilt from the arguments (the lifting core's
:class:`~refax._transforms._lift.Step`) and run nothing, so the arguments are left untouched;
the output, objects included, comes back abstract (``split_output`` / ``merge_output``).

Example:
  >>> import jax
  >>> from refax import nnx
  >>> model = nnx.eval_shape(lambda: nnx.Linear(10_000, 10_000, rngs=nnx.Rngs(0)))
  >>> model.kernel.value
  ShapeDtypeStruct(shape=(10000, 10000), dtype=float32)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax

from refax._graph._flatten import flatten, is_graph_node
from refax._graph._unflatten import unflatten
from refax._refs import has_refs, read
from refax._transforms._checks import (
    check_no_input_outputs,
    check_no_shared,
    check_not_bound_method,
)
from refax._transforms._lift import Static, Step, raw, split_inputs
from refax._transforms._static_args import as_tuple, extract_static, insert_static

__all__ = ["eval_shape", "make_jaxpr"]

A = TypeVar("A")


def _plain(leaf: Any) -> Any:
    """A leaf's raw value with any mutable array reference read (references cannot leave a
    JAX transform)."""
    value = raw(leaf)
    return read(value) if has_refs(value) else value


def split_output(out: Any) -> tuple[Static, list[Any], list[Any]]:
    """An output alone (no link to the inputs) as ``(Static(structure), values, other)``."""
    leaves, treedef = jax.tree_util.tree_flatten(out, is_leaf=is_graph_node)
    pos = tuple(i for i, x in enumerate(leaves) if is_graph_node(x))
    if not pos:
        return Static((treedef, (), None)), [], leaves
    nodes = tuple(leaves[i] for i in pos)
    for i in pos:
        leaves[i] = None
    walk = flatten(nodes)
    return Static((treedef, pos, walk.graphdef)), [_plain(x) for x in walk.leaves], leaves


def merge_output(structure: tuple, values: Sequence[Any], other: Sequence[Any]) -> Any:
    """Inverse of :func:`split_output`: new objects holding ``values``."""
    treedef, pos, graphdef = structure
    leaves = list(other)
    if pos:
        nodes = unflatten(graphdef, list(values), flat=True)
        for p, n in zip(pos, nodes):
            leaves[p] = n
    return jax.tree_util.tree_unflatten(treedef, leaves)


def eval_shape(
    f: Callable[..., A],
    *args: Any,
    graph: bool | None = None,
    graph_updates: bool | None = None,
    **kwargs: Any,
) -> A:
    """Lifted ``jax.eval_shape``: the output of ``f(*args, **kwargs)`` without computing it.

    Nothing runs: arrays in the output become ``jax.ShapeDtypeStruct``, and objects in the
    output are new abstract objects of the same structure whose Variables hold
    ``ShapeDtypeStruct`` values (useful to build a large model's skeleton, then fill it from a
    checkpoint). The arguments' objects are not modified.

    Args:
      f: the function to evaluate.
      *args: positional arguments; may contain objects.
      graph: ``False`` selects tree mode (see below).
      graph_updates: ``False`` refuses aliasing (see below).
      **kwargs: keyword arguments; may contain objects.

    Returns:
      The abstract output.

    With ``graph=False`` or ``graph_updates=False`` the arguments are independent pytrees: a
    Variable passed twice, or an input Variable returned as the output, raises ``ValueError``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> lin = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      >>> nnx.eval_shape(lambda m, x: m(x), lin, jnp.ones((8, 3)))
      ShapeDtypeStruct(shape=(8, 4), dtype=float32)
    """
    check_not_bound_method(f, "eval_shape")
    inputs = split_inputs(args, kwargs, graph=graph, graph_updates=graph_updates)
    if not inputs.updates:
        check_no_shared(inputs.walk.num_refs, "eval_shape")

    def pure(static: Static, values: list[Any], other: list[Any]) -> Any:
        step = Step(static.value, values, other)
        out = step.run(f)
        if not static.value.graph_updates:
            check_no_input_outputs(step.nodes, out, "eval_shape")
        return split_output(out)

    s, values, other = jax.eval_shape(pure, inputs.static(), inputs.values, inputs.other)
    return merge_output(s.value, values, other)


def make_jaxpr(
    f: Callable[..., Any] | None = None,
    *,
    static_argnums: int | Sequence[int] = (),
    return_shape: bool = False,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Lifted ``jax.make_jaxpr``: the ``ClosedJaxpr`` of ``f`` on arguments holding objects.

    The jaxpr's inputs are the state leaves of the argument objects followed by the other
    array leaves; its outputs are the leaves of ``f``'s output (objects contribute their state
    leaves). State updates made inside are not outputs and are not applied: nothing runs.

    Args:
      f: the function (omit it to use ``make_jaxpr(...)`` as a decorator factory).
      static_argnums: positional arguments treated as static Python values.
      return_shape: also return the output's shape, as :func:`eval_shape` would.
      graph: ``False`` selects tree mode (an object or Variable reachable twice among the
        arguments is an error).
      graph_updates: must not be ``True``: nothing runs, so there are no updates to propagate
        (the documented API refuses it too). ``None`` and ``False`` are accepted.

    Returns:
      A function returning the ``ClosedJaxpr`` (and the shape with ``return_shape=True``).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> v = nnx.Param(jnp.ones(3))
      >>> jaxpr = nnx.make_jaxpr(lambda v, x: jnp.sin(v.value) * x)(v, 2.0)
      >>> 'sin' in str(jaxpr)
      True
    """
    if graph_updates:
        raise ValueError(
            "nnx.make_jaxpr does not support graph_updates=True: it runs nothing, so there are "
            "no updates to propagate. Leave graph_updates unset or pass False."
        )
    if f is None:
        return functools.partial(
            make_jaxpr, static_argnums=static_argnums, return_shape=return_shape, graph=graph
        )
    check_not_bound_method(f, "make_jaxpr")
    argnums = as_tuple(static_argnums)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args, kwargs, static_args = extract_static(args, kwargs, argnums, (), "make_jaxpr")
        inputs = split_inputs(args, kwargs, graph=graph, graph_updates=False)
        call = inputs.call()

        def pure(values: list[Any], other: list[Any]) -> Any:
            step = Step(call, values, other)
            a, kw = insert_static(step.args, step.kwargs, static_args)
            return split_output(f(*a, **kw))

        jaxpr, (s, values, other) = jax.make_jaxpr(pure, return_shape=True)(
            inputs.values, inputs.other
        )
        if return_shape:
            return jaxpr, merge_output(s.value, values, other)
        return jaxpr

    return wrapper
