"""``nnx.scan``: ``jax.lax.scan`` over functions that take and return refax objects.

Unlike ``jax.lax.scan``, ``nnx.scan`` mirrors ``nnx.vmap``: each argument gets an axis in
``in_axes`` (an int: scanned over that axis; ``None``: broadcast; ``nnx.Carry``: the carry) and
each output one in ``out_axes`` (``nnx.Carry`` for the carry, an int for stacked outputs).
Objects may be scanned (a stack of layers created by ``nnx.vmap``), carried, or broadcast,
also per Variable with :class:`StateAxes`. Variable updates propagate: scanned state comes back
stacked, carried and broadcast state comes back as its final value. The structure of the
objects must not change inside (JAX's scan needs a fixed carry).

Example (scan over a stack of layers):
  >>> import jax, jax.numpy as jnp
  >>> from refax import nnx
  >>> @nnx.vmap
  ... def make(rngs):
  ...   return nnx.Linear(3, 3, rngs=rngs)
  >>> layers = make(nnx.Rngs(0).split(4))
  >>> @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  ... def forward(layer, x):
  ...   return jnp.tanh(layer(x))
  >>> forward(layers, jnp.ones((2, 3))).shape
  (2, 3)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

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
from refax._transforms._prefix import Carry, _CarryType
from refax._transforms._vmap import _insert_axis, _leaf_variables, _partition_name, _remove_axis
from refax._variables import Variable

__all__ = ["scan"]


def _is_carry(a: Any) -> bool:
    return isinstance(a, _CarryType)


def _to_front(x: Any, axis: int) -> Any:
    return x if axis == 0 else jnp.moveaxis(x, axis, 0)


def _from_front(x: Any, axis: int) -> Any:
    return x if axis == 0 else jnp.moveaxis(x, 0, axis)


class ScanWrapped:
    """The callable returned by :func:`scan`."""

    def __init__(
        self,
        fun: Callable[..., Any],
        *,
        length: int | None = None,
        reverse: bool = False,
        unroll: int | bool = 1,
        in_axes: Any = (Carry, 0),
        out_axes: Any = (Carry, 0),
        transform_metadata: Mapping[str, Any] | None = None,
    ):
        check_not_bound_method(fun, "scan")
        functools.update_wrapper(self, fun)
        self.fun = fun
        self.length = length
        self.reverse = reverse
        self.unroll = unroll
        self.in_axes = in_axes
        self.out_axes = out_axes
        self.partition_name = _partition_name(dict(transform_metadata or {}))

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return functools.partial(self, obj)

    def __call__(self, *args: Any) -> Any:
        inputs = split_inputs(args, {})
        prefixes = args_prefixes(self.in_axes, args, {})
        node_prefixes = [prefixes[p] for p in inputs.node_pos]
        check_input_aliasing(inputs, node_prefixes)
        walk = inputs.walk
        value_axes = tuple(
            leaf_axis(node_prefixes[path[0]], path[1:], leaf)
            for leaf, path in zip(walk.leaves, walk.paths)
        )
        other_axes = [None if x is None else a for x, a in zip(inputs.other, prefixes)]
        n_values, n_other = len(value_axes), len(other_axes)
        v_scan = [i for i, a in enumerate(value_axes) if isinstance(a, int) and not _is_carry(a)]
        v_carry = [i for i in range(n_values) if i not in set(v_scan)]
        o_scan = [i for i, a in enumerate(other_axes) if isinstance(a, int) and not _is_carry(a)]
        o_carry = [i for i, a in enumerate(other_axes) if _is_carry(a)]
        o_const = [i for i, a in enumerate(other_axes) if a is None]
        values, other = inputs.values, inputs.other
        static = Static(
            (inputs.graphdef, inputs.treedef, inputs.node_pos, (value_axes, tuple(node_prefixes)))
        )
        consts = [other[i] for i in o_const]
        out_layout: list[Any] = []  # filled while tracing: the output's structure

        def body(carry: tuple, xs: tuple) -> tuple:
            c_values, c_other = carry
            s_values, s_other = xs
            vals: list[Any] = [None] * n_values
            for i, x in zip(v_carry, c_values):
                vals[i] = x
            for i, x in zip(v_scan, s_values):
                vals[i] = x
            oth: list[Any] = [None] * n_other
            for i, x in zip(o_carry, c_other):
                oth[i] = x
            for i, x in zip(o_scan, s_other):
                oth[i] = x
            for i, x in zip(o_const, consts):
                oth[i] = x
            info, new_values, out_other, out_axes = self._step(static, vals, oth)
            carry_out = [x for x, a in zip(out_other, out_axes) if _is_carry(a)]
            ys_out = [x for x, a in zip(out_other, out_axes) if not _is_carry(a)]
            if [jax.tree.structure(x) for x in carry_out] != [
                jax.tree.structure(x) for x in c_other
            ] or len(carry_out) != len(c_other):
                raise ValueError(
                    "nnx.scan: the carry output must have the same structure as the carry "
                    f"input ({len(c_other)} leaves in, {len(carry_out)} out). Mark the carry "
                    "with nnx.Carry in both in_axes and out_axes."
                )
            out_layout[:] = [info, out_axes]
            # carried state always comes back (a scan carry has a fixed layout); scanned state
            # only where it changed (unchanged layers are not restacked)
            got = dict(zip(info.value.changed, new_values))
            new_carry = ([got[i] for i in v_carry], carry_out)
            ys = ([got[i] for i in v_scan if i in got], ys_out)
            return new_carry, ys

        init = ([values[i] for i in v_carry], [other[i] for i in o_carry])
        xs = (
            [_to_front(values[i], value_axes[i]) for i in v_scan],
            [_to_front(other[i], other_axes[i]) for i in o_scan],
        )
        (c_values, c_other), (s_values, ys_out) = jax.lax.scan(
            body, init, xs, length=self.length, reverse=self.reverse, unroll=self.unroll
        )
        info, out_axes = out_layout
        changed = info.value.changed
        got: dict[int, Any] = dict(zip(v_carry, c_values))
        changed_scan = [i for i in v_scan if i in set(changed)]
        got.update((i, _from_front(x, value_axes[i])) for i, x in zip(changed_scan, s_values))
        new_values = [got[i] for i in changed]
        ic, iy, ia = iter(c_other), iter(ys_out), iter(out_axes)
        out_other = []
        for i in range(info.value.out_treedef.num_leaves):
            if i in info.value.out_pos:
                out_other.append(None)
                continue
            a = next(ia)
            out_other.append(next(ic) if _is_carry(a) else _from_front(next(iy), a))
        return apply_outputs(inputs, info.value, new_values, out_other)

    def _step(self, static: Static, values: list, other: list):
        graphdef, _, _, extra = static.value
        value_axes, node_prefixes = extra
        args, kwargs, nodes, built = rebuild_inputs(static.value, values, other)
        name = self.partition_name
        if name is not None:
            for var, axis in zip(_leaf_variables(nodes), value_axes):
                if isinstance(var, Variable) and isinstance(axis, int) and not _is_carry(axis):
                    _remove_axis(var, axis, name)
        out = self.fun(*args, **kwargs)
        before = None
        if name is not None:

            def before(joint: Any) -> None:
                for leaf, axis in zip(joint.leaves, value_axes):
                    if isinstance(leaf, Variable) and isinstance(axis, int):
                        if not _is_carry(axis):
                            _insert_axis(leaf, axis, name)

        carried = tuple(not (isinstance(a, int) and not _is_carry(a)) for a in value_axes)
        info, new_values, out_other = collect_outputs(
            graphdef, values, nodes, built, out, every_input=carried, before_walk=before
        )
        if not info.unchanged:
            raise ValueError(
                "nnx.scan: the function changed the structure of its objects (added, removed or "
                "re-shared attributes, or returned new objects); scan needs the same structure "
                "at every step. Make structural changes outside the scan."
            )
        out_leaves = jax.tree_util.tree_leaves(out, is_leaf=is_node)
        prefixes = broadcast_prefix(self.out_axes, out, "out_axes")
        node_out = [(x, a) for x, a in zip(out_leaves, prefixes) if is_node(x)]
        if node_out:  # an input object returned must keep its axes
            checker = AliasChecker()
            for node, prefix in zip(nodes, node_prefixes):
                checker.add(node, prefix)
            for node, prefix in node_out:
                checker.add(node, prefix)
        axes = []
        for x, a in zip(out_leaves, prefixes):
            if is_node(x):
                continue
            if a is None:
                raise ValueError(
                    "nnx.scan: out_axes may not be None; use nnx.Carry for a value carried "
                    "across steps or an int for stacked outputs."
                )
            axes.append(a)
        node_slots = set(info.out_pos)
        leaves = [x for i, x in enumerate(out_other) if i not in node_slots]
        return Static(info), new_values, leaves, axes


def scan(
    f: Callable[..., Any] | None = None,
    *,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    in_axes: Any = (Carry, 0),
    out_axes: Any = (Carry, 0),
    transform_metadata: Mapping[str, Any] | None = None,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Lifted ``jax.lax.scan`` with per-argument axes and ``nnx.Carry`` (see module docs)."""
    kwargs = dict(
        length=length,
        reverse=reverse,
        unroll=unroll,
        in_axes=in_axes,
        out_axes=out_axes,
        transform_metadata=transform_metadata,
    )
    if f is None:
        return lambda fn: ScanWrapped(fn, **kwargs)
    return ScanWrapped(f, **kwargs)
