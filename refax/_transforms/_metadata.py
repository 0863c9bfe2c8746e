"""``nnx.transform_metadata``: keeping Variables' sharding metadata in step with a mapped axis
when the enclosing transform does not (``graph_updates=False``, or a plain JAX transform).

A lifted ``vmap`` / ``scan`` given ``transform_metadata={nnx.PARTITION_NAME: name}`` removes
the mapped axis from each Variable's ``out_sharding`` inside and puts ``name`` back outside.
This decorator does the same around a function, from prefixes of its own, so it can sit
directly inside any mapping transform::

    @nnx.vmap(in_axes=(None,), out_axes=0, axis_size=4, graph_updates=False)
    @nnx.transform_metadata(in_axes=(None,), out_axes=0, partition="layers")
    def make(rngs): ...
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from refax._graph._api import iter_graph
from refax._graph._flatten import is_graph_node
from refax._transforms._axes import args_prefixes, broadcast_prefix
from refax._transforms._axis_metadata import insert_axis, remove_axis
from refax._transforms._prefix import leaf_axis
from refax._variables import Variable

__all__ = ["transform_metadata"]


def _variables(node: Any, prefix: Any, graph: bool | None) -> list[tuple[Variable, int]]:
    """The Variables of ``node`` with an int axis under ``prefix`` (each once)."""
    if prefix is None:
        return []
    found = []
    for path, x in iter_graph(node, graph=graph):
        if isinstance(x, Variable):
            axis = leaf_axis(prefix, path, x)
            if isinstance(axis, int) and not isinstance(axis, bool):
                found.append((x, axis))
    return found


def transform_metadata(
    f: Callable[..., Any] | None = None,
    *,
    in_axes: Any = 0,
    out_axes: Any = 0,
    partition: str | None,
    graph: bool | None = None,
) -> Any:
    """Updates the sharding metadata of the Variables a mapping transform maps over.

    On entry, every Variable of an argument mapped over an int axis (by ``in_axes``) loses
    that axis from its ``out_sharding`` (its ``remove_axis`` runs); on exit the arguments'
    Variables get ``partition`` back at that axis, and every Variable of the output mapped by
    ``out_axes`` gets ``partition`` inserted at its axis (``add_axis`` runs).

    Args:
      f: the function; omit it to use ``transform_metadata(...)`` as a decorator.
      in_axes: prefix of the positional arguments (ints, None, ``nnx.Carry``, StateAxes), as
        given to the enclosing transform.
      out_axes: prefix of the output.
      partition: the mesh axis name of the mapped axis (None only runs the callbacks).
      graph: graph mode for finding the Variables (None reads the default).

    Returns:
      The wrapped function, or a decorator when ``f`` is omitted.

    Example:
      >>> import jax
      >>> from refax import nnx
      >>> @nnx.vmap(in_axes=(None,), out_axes=0, axis_size=4, graph_updates=False)
      ... @nnx.transform_metadata(in_axes=(None,), out_axes=0, partition="layers")
      ... def make(rngs):
      ...   init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("din", "dout"))
      ...   return nnx.Linear(2, 3, kernel_init=init, rngs=rngs)
      >>> mesh = jax.make_mesh((1, 1, 1), ("layers", "din", "dout"))
      >>> with jax.set_mesh(mesh):
      ...   layers = make(nnx.Rngs(0))
      >>> layers.kernel.shape, layers.kernel.out_sharding
      ((4, 2, 3), ('layers', 'din', 'dout'))
    """
    if f is None:
        return functools.partial(
            transform_metadata,
            in_axes=in_axes,
            out_axes=out_axes,
            partition=partition,
            graph=graph,
        )

    @functools.wraps(f)
    def wrapper(*args: Any) -> Any:
        leaves = jax.tree_util.tree_leaves(args, is_leaf=is_graph_node)
        prefixes = args_prefixes(in_axes, args, {})
        inputs = [
            (var, axis)
            for leaf, prefix in zip(leaves, prefixes)
            if is_graph_node(leaf)
            for var, axis in _variables(leaf, prefix, graph)
        ]
        seen: set[int] = set()
        for var, axis in inputs:
            if id(var) not in seen:
                seen.add(id(var))
                remove_axis(var, axis, partition)
        out = f(*args)
        for var, axis in inputs:
            if id(var) in seen:
                seen.discard(id(var))
                insert_axis(var, axis, partition)
        out_leaves = jax.tree_util.tree_leaves(out, is_leaf=is_graph_node)
        out_prefixes = broadcast_prefix(out_axes, out, "out_axes")
        done = {id(var) for var, _ in inputs}  # inputs got their axes back already
        for leaf, prefix in zip(out_leaves, out_prefixes):
            if is_graph_node(leaf):
                for var, axis in _variables(leaf, prefix, graph):
                    if id(var) not in done:
                        done.add(id(var))
                        insert_axis(var, axis, partition)
        return out

    return wrapper
