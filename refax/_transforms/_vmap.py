"""``nnx.vmap``: ``jax.vmap`` over functions that take and return refax objects.

``in_axes``/``out_axes`` are pytree prefixes in which an object takes an int, ``None``
(broadcast) or a :class:`StateAxes` (per-Variable axes). Objects created inside are returned
stacked (vectorised initialisation); updates to the inputs' Variables and to their structure
propagate out. ``transform_metadata={nnx.PARTITION_NAME: name}`` removes the mapped axis from
the Variables' sharding names inside and inserts ``name`` at the output axis outside.

Because the output structure (and so ``out_axes`` for the state leaves) is only known after
tracing, a call first traces abstractly (``jax.eval_shape``) to learn it, then runs
``jax.vmap`` with the right axes.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from refax import nnx
  >>> class Weights(nnx.Module):
  ...   def __init__(self, seed):
  ...     self.kernel = nnx.Param(jax.random.uniform(jax.random.key(seed), (2, 3)))
  >>> weights = nnx.vmap(Weights)(jnp.arange(4))
  >>> weights.kernel.shape
  (4, 2, 3)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax

from refax._transforms._axes import (
    AliasChecker,
    args_prefixes,
    broadcast_prefix,
    check_input_aliasing,
    leaf_axis,
)
from refax._transforms._jit import check_not_bound_method
from refax._transforms._lift import (
    Static,
    apply_outputs,
    collect_outputs,
    is_node,
    rebuild_inputs,
    split_inputs,
)
from refax._variables import Variable

__all__ = ["vmap"]

_SHARDING_KEY = "out_sharding"


def _partition_name(transform_metadata: Mapping[str, Any]) -> Any:
    from refax._transforms._prefix import PARTITION_NAME

    return transform_metadata.get(PARTITION_NAME) if transform_metadata else None


def _remove_axis(var: Variable, axis: int) -> None:
    names = var._var_metadata.get(_SHARDING_KEY)
    if isinstance(names, tuple) and -len(names) <= axis < len(names):
        names = names[:axis] + names[axis + 1 :] if axis >= 0 else names
        var._var_metadata = {**var._var_metadata, _SHARDING_KEY: names}
        var._frozen = None


def _insert_axis(var: Variable, axis: int, name: Any) -> None:
    names = var._var_metadata.get(_SHARDING_KEY)
    if isinstance(names, tuple):
        axis = axis if axis >= 0 else len(names) + 1 + axis
        names = (*names[:axis], name, *names[axis:])
        var._var_metadata = {**var._var_metadata, _SHARDING_KEY: names}
        var._frozen = None


class VmapWrapped:
    """The callable returned by :func:`vmap`."""

    def __init__(
        self,
        fun: Callable[..., Any],
        *,
        in_axes: Any = 0,
        out_axes: Any = 0,
        axis_name: Any = None,
        axis_size: int | None = None,
        spmd_axis_name: Any = None,
        transform_metadata: Mapping[str, Any] | None = None,
    ):
        check_not_bound_method(fun, "vmap")
        functools.update_wrapper(self, fun)
        self.fun = fun
        self.in_axes = in_axes
        self.out_axes = out_axes
        self.axis_name = axis_name
        self.axis_size = axis_size
        self.spmd_axis_name = spmd_axis_name
        self.partition_name = _partition_name(dict(transform_metadata or {}))

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return functools.partial(self, obj)

    # -- inside ----------------------------------------------------------------------------
    def _pure(self, cells: tuple[list, list], static: Static, values: list, other: list):
        graphdef, _, _, extra = static.value
        value_axes, node_prefixes = extra
        args, kwargs, nodes, built = rebuild_inputs(static.value, values, other)
        name = self.partition_name
        if name is not None:
            for leaf_var, axis in zip(_leaf_variables(nodes), value_axes):
                if isinstance(leaf_var, Variable) and isinstance(axis, int):
                    _remove_axis(leaf_var, axis)
        out = self.fun(*args, **kwargs)

        out_leaves = jax.tree_util.tree_leaves(out, is_leaf=is_node)
        out_prefixes = broadcast_prefix(self.out_axes, out, "out_axes")
        node_out = [p for p, x in zip(out_prefixes, out_leaves) if is_node(x)]
        out_nodes = [x for x in out_leaves if is_node(x)]
        # an input object returned as an output must keep its axes
        inner_index = {id(n): i for i, n in enumerate(nodes)}
        if any(id(n) in inner_index for n in out_nodes):
            checker = AliasChecker()
            for node, prefix in zip(nodes, node_prefixes):
                checker.add(node, prefix)
            for node, prefix in zip(out_nodes, node_out):
                if id(node) in inner_index:
                    checker.add(node, prefix)

        def leaf_axes(joint: Any) -> list[Any]:
            axes = []
            for leaf, path in zip(joint.leaves, joint.paths):
                prefix = node_prefixes[path[1]] if path[0] == 0 else node_out[path[1]]
                axes.append(leaf_axis(prefix, path[2:], leaf))
            return axes

        def before(joint: Any) -> None:
            for leaf, axis in zip(joint.leaves, leaf_axes(joint)):
                if isinstance(leaf, Variable) and isinstance(axis, int):
                    _insert_axis(leaf, axis, name)

        info, new_values, out_other = collect_outputs(
            graphdef,
            values,
            nodes,
            built,
            out,
            every_input=True,
            before_walk=before if name is not None else None,
            annotate=leaf_axes,
        )
        value_cell, other_cell = cells
        value_cell[:] = list(value_axes) if info.unchanged else list(info.annotation)
        other_cell[:] = [None if i in info.out_pos else a for i, a in enumerate(out_prefixes)]
        return Static(info), new_values, out_other

    # -- outside ---------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = split_inputs(args, kwargs)
        prefixes = args_prefixes(self.in_axes, args, kwargs)
        node_prefixes = [prefixes[p] for p in inputs.node_pos]
        check_input_aliasing(inputs, node_prefixes)
        walk = inputs.walk
        value_axes = tuple(
            leaf_axis(node_prefixes[path[0]], path[1:], leaf)
            for leaf, path in zip(walk.leaves, walk.paths)
        )
        other_axes = [None if x is None else a for x, a in zip(inputs.other, prefixes)]
        static = Static(
            (inputs.graphdef, inputs.treedef, inputs.node_pos, (value_axes, tuple(node_prefixes)))
        )
        vmap_kwargs: dict[str, Any] = dict(axis_name=self.axis_name, axis_size=self.axis_size)
        if self.spmd_axis_name is not None:
            vmap_kwargs["spmd_axis_name"] = self.spmd_axis_name
        # out_axes for the state leaves are known only once the function is traced: the
        # pure function fills these lists, which jax.vmap reads after tracing.
        cells: tuple[list, list] = ([], [])
        run = jax.vmap(
            functools.partial(self._pure, cells),
            in_axes=(None, list(value_axes), other_axes),
            out_axes=(None, cells[0], cells[1]),
            **vmap_kwargs,
        )
        info, values, out_other = run(static, inputs.values, inputs.other)
        return apply_outputs(inputs, info.value, values, out_other)


def _leaf_variables(nodes: tuple) -> list[Any]:
    from refax._graph._flatten import flatten

    return flatten(nodes).leaves


def vmap(
    f: Callable[..., Any] | None = None,
    *,
    in_axes: Any = 0,
    out_axes: Any = 0,
    axis_name: Any = None,
    axis_size: int | None = None,
    spmd_axis_name: Any = None,
    transform_metadata: Mapping[str, Any] | None = None,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Lifted ``jax.vmap``: objects in arguments and outputs, ``StateAxes`` prefixes."""
    kwargs = dict(
        in_axes=in_axes,
        out_axes=out_axes,
        axis_name=axis_name,
        axis_size=axis_size,
        spmd_axis_name=spmd_axis_name,
        transform_metadata=transform_metadata,
    )
    if f is None:
        return lambda fn: VmapWrapped(fn, **kwargs)
    return VmapWrapped(f, **kwargs)
