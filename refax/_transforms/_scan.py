"""``nnx.scan``: ``jax.lax.scan`` over functions that take and return refax objects.

Unlike ``jax.lax.scan``, ``nnx.scan`` mirrors ``nnx.vmap``: each argument gets an axis in
``in_axes`` (an int: scanned over that axis; ``None``: broadcast; ``nnx.Carry``: the carry) and
each output one in ``out_axes`` (``nnx.Carry`` for the carry, an int for stacked outputs).
Objects may be scanned (a stack of layers created by ``nnx.vmap``), carried, or broadcast,
also per Variable with :class:`StateAxes`. Variable updates propagate: scanned state comes back
stacked, carried and broadcast state comes back as its final value. The structure of the
input objects must not change inside (JAX's scan needs a fixed carry); objects created inside
and returned with an int out axis come back stacked (creating a stack of layers in a scan).
The body is kept per argument structure and shapes, so JAX traces it once, as for ``nnx.jit``.

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

import dataclasses
import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from refax._graph._flatten import flatten, is_graph_node
from refax._transforms._axes import (
    args_prefixes,
    bind_keywords,
    broadcast_prefix,
    check_input_aliasing,
)
from refax._transforms._axis_metadata import insert_axis, partition_name, remove_axis
from refax._transforms._checks import check_no_input_returned, check_not_bound_method
from refax._transforms._lift import Static, Step, apply_outputs, split_inputs
from refax._transforms._prefix import (
    AliasChecker,
    Carry,
    StateAxes,
    _CarryType,
    check_prefix,
    leaf_axis,
)
from refax._variables import Variable

__all__ = ["scan"]


@dataclasses.dataclass(frozen=True, slots=True)
class ScanSettings:
    """scan's part of a call's static data."""

    value_axes: tuple  # the axis (int), nnx.Carry or None of each state leaf
    node_prefixes: tuple  # the in_axes prefix of each argument object


def _is_carry(a: Any) -> bool:
    return isinstance(a, _CarryType)


def _carries(axes: Any) -> int:
    leaves = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: x is None or _is_carry(x))
    return sum(1 for a in leaves if _is_carry(a))


def _check_scan_axes(in_axes: Any, out_axes: Any) -> None:
    """The rules on ``in_axes`` / ``out_axes`` that hold whatever the arguments."""
    n_in, n_out = _carries(in_axes), _carries(out_axes)
    if n_in > 1 or n_out > 1:
        raise ValueError(
            "nnx.scan: Found multiple Carry definitions in "
            f"{'in_axes' if n_in > 1 else 'out_axes'}: there is one carry, so nnx.Carry may "
            "appear once (make the carry a tuple to carry several values)."
        )
    if (n_in == 0) != (n_out == 0):
        raise ValueError(
            "nnx.scan: If one of in_axes or out_axes has Carry, the other must also have "
            f"Carry (in_axes={in_axes!r}, out_axes={out_axes!r}): the carry goes in and comes "
            "out of every step."
        )
    for a in jax.tree_util.tree_leaves(
        out_axes, is_leaf=lambda x: x is None or isinstance(x, StateAxes)
    ):
        if a is None:
            raise ValueError(
                "nnx.scan: Cannot broadcast output state: out_axes may not be None (a scan "
                "output is either carried, nnx.Carry, or stacked, an int)."
            )
        if isinstance(a, StateAxes):
            raise ValueError(
                f"nnx.scan: Cannot broadcast output state. Got StateAxes in out_axes ({a!r}): "
                "an output object's state is carried or stacked as its input's was; give "
                "nnx.Carry or an int."
            )


def _is_array(x: Any) -> bool:
    """Arrays go through the carry; Python scalars stay concrete (the body may branch on
    them, as on any broadcast Python value)."""
    return isinstance(x, (jax.Array, np.ndarray))


_PLAIN = (str, bytes, int, float, complex, bool, type(None), np.generic)


def _avals(xs: list) -> tuple:
    """Shapes and dtypes of the array leaves (what a trace depends on besides structure)."""
    return tuple(
        (type(x), np.shape(x), getattr(x, "dtype", None), getattr(x, "weak_type", None))
        if x is not None and not isinstance(x, str)
        else x
        for x in xs
    )


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
        graph: bool | None = None,
        graph_updates: bool | None = None,
    ):
        check_not_bound_method(fun, "scan")
        check_prefix(in_axes, "in_axes", "scan", graph, graph_updates)
        check_prefix(out_axes, "out_axes", "scan", graph, graph_updates)
        _check_scan_axes(in_axes, out_axes)
        self.graph, self.graph_updates = graph, graph_updates
        self._bodies: dict[tuple, tuple[Callable, list]] = {}
        functools.update_wrapper(self, fun)
        self.fun = fun
        self.length = length
        self.reverse = reverse
        self.unroll = unroll
        self.in_axes = in_axes
        self.out_axes = out_axes
        self.partition_name = partition_name(transform_metadata)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return functools.partial(self, obj)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _is_carry(self.in_axes) and len(args) != 1:
            raise ValueError(
                "nnx.scan: When in_axes=Carry, the function must take exactly one argument "
                f"(the carry), got {len(args)}. Use in_axes=(nnx.Carry, 0, ...) to scan over "
                "the others."
            )
        args, kwargs = bind_keywords(self.fun, args, kwargs, self.in_axes)
        if kwargs:
            raise TypeError(
                f"nnx.scan: keyword arguments {sorted(kwargs)} have no entry in in_axes; pass "
                "them positionally (scan needs an axis or nnx.Carry for every argument)."
            )
        inputs = split_inputs(args, {}, graph=self.graph, graph_updates=self.graph_updates)
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
        static = inputs.static(ScanSettings(value_axes, tuple(node_prefixes)))
        # Arrays among the broadcast arguments travel in the carry, so the body depends on
        # hashable data only and is kept per structure: JAX then reuses its trace (one trace
        # per argument structure and shapes, as for nnx.jit).
        o_dyn = tuple(i for i in o_const if other[i] is None or _is_array(other[i]))
        o_fixed = tuple((i, other[i]) for i in o_const if i not in set(o_dyn))
        layout = (tuple(v_carry), tuple(v_scan), tuple(o_carry), tuple(o_scan), o_dyn, o_fixed)
        body, out_layout = self._body(static, n_values, n_other, layout, values, other)

        init = (
            [values[i] for i in v_carry],
            [other[i] for i in o_carry],
            [other[i] for i in o_dyn],
        )
        xs = (
            [_to_front(values[i], value_axes[i]) for i in v_scan],
            [_to_front(other[i], other_axes[i]) for i in o_scan],
        )
        (c_values, c_other, _), (s_values, ys_out, new_leaves) = jax.lax.scan(
            body, init, xs, length=self.length, reverse=self.reverse, unroll=self.unroll
        )
        info, out_axes = out_layout
        got: dict[int, Any] = dict(zip(v_carry, c_values))
        if info.value.unchanged:
            changed = info.value.changed
            changed_scan = [i for i in v_scan if i in set(changed)]
            got.update((i, _from_front(x, value_axes[i])) for i, x in zip(changed_scan, s_values))
            new_values = [got[i] for i in changed]
        else:
            got.update((i, _from_front(x, value_axes[i])) for i, x in zip(v_scan, s_values))
            stacked = iter(new_leaves)
            new_values = [
                got[i] if isinstance(i, int) else _from_front(next(stacked), i[1])
                for i in info.value.annotation
            ]
        ic, iy, ia = iter(c_other), iter(ys_out), iter(out_axes)
        out_other = []
        for i in range(info.value.out_treedef.num_leaves):
            if i in info.value.out_pos:
                out_other.append(None)
                continue
            a = next(ia)
            out_other.append(next(ic) if _is_carry(a) else _from_front(next(iy), a))
        return apply_outputs(inputs, info.value, new_values, out_other)

    def _body(
        self, static: Static, n_values: int, n_other: int, layout: tuple, values: list, other: list
    ) -> tuple[Callable, list]:
        """The scan body for this argument structure and these shapes (kept, so JAX reuses its
        trace), and the list its trace fills with the output's structure."""
        key = (static, layout, _avals(values), _avals(other))
        if not all(isinstance(x, _PLAIN) for _, x in layout[5]):
            key = None  # a kept body must not keep the user's other objects alive
        try:
            entry = None if key is None else self._bodies.get(key)
        except TypeError:  # an unhashable prefix or static argument: no reuse
            key, entry = None, None
        if entry is not None:
            return entry
        v_carry, v_scan, o_carry, o_scan, o_dyn, o_fixed = layout
        wrapper_ref = weakref.ref(self)  # the kept body must not keep the wrapper alive
        out_layout: list[Any] = []  # filled while tracing: the output's structure

        def body(carry: tuple, xs: tuple) -> tuple:
            c_values, c_other, c_consts = carry
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
            for i, x in zip(o_dyn, c_consts):
                oth[i] = x
            for i, x in o_fixed:
                oth[i] = x
            wrapped = wrapper_ref()
            assert wrapped is not None  # the wrapper calls the body, so it is alive
            info, new_values, out_other, out_axes = wrapped._step(static, vals, oth)
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
            if info.value.unchanged:
                # carried state always comes back (a scan carry has a fixed layout); scanned
                # state only where it changed (unchanged layers are not restacked)
                got = dict(zip(info.value.changed, new_values))
                new_leaves: list[Any] = []
            else:  # new leaves (stacked) among the input leaves, in the joint walk's order
                found = info.value.annotation
                got = {i: v for i, v in zip(found, new_values) if isinstance(i, int)}
                new_leaves = [v for i, v in zip(found, new_values) if not isinstance(i, int)]
            new_carry = ([got[i] for i in v_carry], carry_out, c_consts)
            ys = ([got[i] for i in v_scan if i in got], ys_out, new_leaves)
            return new_carry, ys

        if key is not None:
            if len(self._bodies) >= 32:
                self._bodies.pop(next(iter(self._bodies)))
            self._bodies[key] = (body, out_layout)
        return body, out_layout

    def _step(self, static: Static, values: list, other: list):
        step = Step(static.value, values, other)
        value_axes, node_prefixes = step.settings.value_axes, step.settings.node_prefixes
        nodes = step.nodes
        walk = flatten(nodes, with_paths=True)  # before the function can change them
        leaves = walk.leaves
        source = {(0, *p): i for i, p in enumerate(walk.paths)}  # joint path -> input leaf
        name = self.partition_name
        if name is not None:
            for var, axis in zip(leaves, value_axes):
                if isinstance(var, Variable) and isinstance(axis, int) and not _is_carry(axis):
                    remove_axis(var, axis, name)
        out = step.run(self.fun)
        if not step.call.graph_updates:
            # objects are pytrees: a scanned input Variable may not be an output
            scanned = [
                leaf
                for leaf, a in zip(leaves, value_axes)
                if isinstance(a, int) and not _is_carry(a)
            ]
            check_no_input_returned("scan", scanned, out)
        out_leaves = jax.tree_util.tree_leaves(out, is_leaf=is_graph_node)
        prefixes = broadcast_prefix(self.out_axes, out, "out_axes")
        out_prefixes = [p for x, p in zip(out_leaves, prefixes) if is_graph_node(x)]

        def axes_of(joint: Any) -> list[Any]:
            """Per joint leaf: its input leaf's index, or (-1, stacking axis) for a new one."""
            found = []
            for leaf, path in zip(joint.leaves, joint.paths):
                i = source.get(path, -1)
                if i < 0:
                    prefix = node_prefixes[path[1]] if path[0] == 0 else out_prefixes[path[1]]
                    i = (-1, leaf_axis(prefix, path[2:], leaf))
                found.append(i)
            return found

        before = None
        if name is not None:

            def before(joint: Any) -> None:
                for leaf, i in zip(joint.leaves, axes_of(joint)):
                    axis = value_axes[i] if isinstance(i, int) else None
                    if isinstance(leaf, Variable) and isinstance(axis, int):
                        if not _is_carry(axis):
                            insert_axis(leaf, axis, name)

        carried = tuple(not (isinstance(a, int) and not _is_carry(a)) for a in value_axes)
        info, new_values, out_other = step.collect(
            out, every_input=carried, before_walk=before, annotate=axes_of
        )
        if not info.unchanged:
            info.annotation = _stacked_leaves(info, len(leaves))
        node_out = [(x, a) for x, a in zip(out_leaves, prefixes) if is_graph_node(x)]
        if node_out:  # an input object returned must keep its axes
            checker = AliasChecker()
            for node, prefix in zip(nodes, node_prefixes):
                checker.add(node, prefix)
            for node, prefix in node_out:
                checker.add(node, prefix)
        axes = []
        for x, a in zip(out_leaves, prefixes):
            if is_graph_node(x):
                continue
            if a is None:
                raise ValueError(
                    "nnx.scan: Cannot broadcast output state: out_axes may not be None; use "
                    "nnx.Carry for a value carried across steps or an int for stacked outputs."
                )
            axes.append(a)
        node_slots = set(info.out_pos)
        leaves = [x for i, x in enumerate(out_other) if i not in node_slots]
        return Static(info), new_values, leaves, axes


def _stacked_leaves(info: Any, n_inputs: int) -> tuple:
    """A changed structure's annotation: per joint leaf, the input leaf it is (an int) or the
    stacking axis of a new one (``(-1, axis)``): leaves of objects created inside the scan, and
    Variables added to scanned input objects (e.g. by lazy initialisation in the body)."""
    found = info.annotation
    if len({i for i in found if isinstance(i, int)}) != n_inputs:
        raise ValueError(
            "nnx.scan: the function removed or re-shared attributes of its input objects; "
            "scan needs the same structure at every step. Make structural changes outside "
            "the scan."
        )
    for i, path in zip(found, info.paths):
        if isinstance(i, int):
            continue
        axis, where = i[1], "/".join(map(str, path[2:]))
        if _is_carry(axis):
            raise ValueError(
                "nnx.scan: Carry references must be the same between iterations, and scan "
                "Variable identity must be preserved across iterations: the function "
                "returned a new object or Variable as (part of) the carry, at "
                f"'{where}'. Update the carried object in place and return it."
            )
        if not isinstance(axis, int):
            raise ValueError(
                "nnx.scan: an object or Variable created inside the scan must be stacked (an "
                f"int in in_axes or out_axes), got {axis!r} for the leaf at {where}."
            )
    return tuple(found)


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
    """Lifted ``jax.lax.scan``: per-argument axes, ``nnx.Carry``, objects in and out.

    Usable as ``@nnx.scan``, ``@nnx.scan(...)`` or ``nnx.scan(f, ...)``, also on methods in a
    class body.

    Args:
      f: the step function. It receives one slice of every scanned argument, the carry, and
        the broadcast arguments, and returns outputs matching ``out_axes``.
      length: the number of steps (needed when nothing is scanned).
      reverse: scan from the last slice to the first.
      unroll: as for ``jax.lax.scan``.
      in_axes: a prefix of the positional arguments: an int (scanned over that axis),
        ``None`` (broadcast), ``nnx.Carry`` (the carry, at most once) or, for an object, a
        :class:`StateAxes` choosing per Variable. A bare ``nnx.Carry`` means the function
        takes only the carry.
      out_axes: a prefix of the output: ``nnx.Carry`` (exactly where ``in_axes`` has it) or an
        int (stacked along that axis). ``None`` is refused: nothing can be broadcast out.
      transform_metadata: ``{nnx.PARTITION_NAME: name}`` removes the scanned axis from the
        Variables' sharding metadata inside and puts ``name`` back outside.
      graph, graph_updates: graph mode (False: tree mode, shared references rejected) and
        whether structural changes propagate; None reads ``set_graph_mode`` /
        ``set_graph_updates``.

    Returns:
      The scanned function; it returns the final carry and the stacked outputs.

    Raises:
      ValueError: when made, for several ``nnx.Carry`` entries, a Carry on one side only, or
        ``None`` / ``StateAxes`` in ``out_axes``; when called, for an object whose structure
        changed inside, or a new object returned as the carry.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> class Counter(nnx.Module):
      ...   def __init__(self):
      ...     self.total = nnx.BatchStat(jnp.array(0.0))
      >>> @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
      ... def accumulate(counter, x):
      ...   counter.total[...] += x
      ...   return counter, counter.total[...]
      >>> counter = Counter()
      >>> _, running = accumulate(counter, jnp.arange(1.0, 5.0))
      >>> running, counter.total[...]
      (Array([ 1.,  3.,  6., 10.], dtype=float32), Array(10., dtype=float32))
    """
    kwargs = dict(
        length=length,
        reverse=reverse,
        unroll=unroll,
        in_axes=in_axes,
        out_axes=out_axes,
        transform_metadata=transform_metadata,
        graph=graph,
        graph_updates=graph_updates,
    )
    if f is None:
        return lambda fn: ScanWrapped(fn, **kwargs)
    return ScanWrapped(f, **kwargs)
