"""``nnx.vmap``: ``jax.vmap`` over functions that take and return refax objects.

``in_axes``/``out_axes`` are pytree prefixes in which an object takes an int, ``None``
(broadcast) or a :class:`StateAxes` (per-Variable axes). Objects created inside are returned
stacked (vectorised initialisation); updates to the inputs' Variables and to their structure
propagate out. ``transform_metadata={nnx.PARTITION_NAME: name}`` removes the mapped axis from
the Variables' sharding names inside and inserts ``name`` at the output axis outside.

The function is traced once. The output axes of the state leaves are only known once it has
run (objects may be created, returned or restructured inside), so the pure function fills the
lists passed to ``jax.vmap`` as ``out_axes``, which ``jax.vmap`` flattens only after tracing.
:class:`MappedWrapped` holds the machinery shared with ``nnx.pmap`` and ``nnx.shard_map``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from refax import nnx
  >>> class Weights(nnx.Module):
  ...   def __init__(self, seed):
  ...     self.kernel = nnx.Param(jax.random.uniform(jax.random.key(seed), (2, 3)))
  >>> weights = nnx.vmap(Weights)(jnp.arange(4))
  >>> weights.kernel.shape
  (4, 2, 3)
  >>> y = nnx.vmap(lambda w, x: x @ w.kernel, in_axes=(0, None), out_axes=1)(weights, jnp.ones(2))
  >>> y.shape
  (3, 4)
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax

from refax._graph._flatten import is_graph_node
from refax._transforms._axes import (
    args_prefixes,
    bind_keywords,
    broadcast_prefix,
    check_input_aliasing,
    is_axis_leaf,
)
from refax._transforms._axis_metadata import (
    insert_axis,
    other_fields,
    partition_name,
    remove_axis,
)
from refax._transforms._checks import (
    check_not_bound_method,
    check_not_captured,
    check_output_types,
)
from refax._transforms._lift import (
    Info,
    Inputs,
    Static,
    Step,
    apply_outputs,
    input_leaves,
    split_inputs,
)
from refax._transforms._prefix import AliasChecker, check_prefix, leaf_axis
from refax._variables import Variable

__all__ = ["vmap", "VmapWrapped", "MappedWrapped"]


@dataclasses.dataclass(frozen=True, slots=True)
class MapSettings:
    """The mapping transforms' part of a call's static data."""

    value_axes: tuple  # the axis (or PartitionSpec) of each state leaf
    node_prefixes: tuple  # the in-prefix of each argument object
    static_args: tuple = ()  # pmap's static_broadcasted_argnums (see _static_args)
    value_mask: tuple = ()  # pmap's donated state leaves
    other_mask: tuple = ()  # pmap's donated other leaves


class MappedWrapped:
    """Shared machinery of the mapping transforms (vmap, pmap, shard_map).

    Each state leaf of the argument objects and each other argument leaf gets an axis (or a
    PartitionSpec for shard_map) from the ``in_prefix`` prefix; after the user function ran,
    each returned leaf gets one from ``out_prefix`` (state of input objects keeps its input
    axis; an object both passed in and returned must get the same axis in both).
    """

    _transform = "vmap"
    _in_what, _out_what = "in_axes", "out_axes"
    _is_leaf: Callable[[Any], bool] = staticmethod(is_axis_leaf)
    _every_input = False  # only changed state comes back (unchanged batched state: no copy)

    fun: Callable[..., Any]
    in_prefix: Any
    out_prefix: Any
    partition_name: Any = None
    axis_metadata: Mapping[str, Any] = {}  # transform_metadata entries besides PARTITION_NAME
    graph: bool | None = None  # None: the set_graph_mode / set_graph_updates defaults
    graph_updates: bool | None = None

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return functools.partial(self, obj)

    # -- outside ---------------------------------------------------------------------------
    def _prepare(
        self, args: tuple, kwargs: dict, in_prefix: Any, static_args: tuple = ()
    ) -> tuple[Inputs, tuple, list, Static]:
        """Splits the arguments; returns (inputs, value_axes, other_axes, static)."""
        args, kwargs = bind_keywords(self.fun, args, kwargs, in_prefix)
        inputs = split_inputs(args, kwargs, graph=self.graph, graph_updates=self.graph_updates)
        prefixes = args_prefixes(in_prefix, args, kwargs, is_leaf=self._is_leaf, what=self._in_what)
        node_prefixes = [prefixes[p] for p in inputs.node_pos]
        check_input_aliasing(inputs, node_prefixes)
        walk = inputs.walk
        value_axes = tuple(
            leaf_axis(node_prefixes[path[0]], path[1:], leaf)
            for leaf, path in zip(walk.leaves, walk.paths)
        )
        other_axes = [None if x is None else a for x, a in zip(inputs.other, prefixes)]
        static = inputs.static(MapSettings(value_axes, tuple(node_prefixes), static_args))
        return inputs, value_axes, other_axes, static

    def _every_input_for(self, updates: bool) -> bool:
        """Whether every input leaf comes back (``Step.collect``'s ``every_input``)."""
        return self._every_input

    def _call_fun(self, step: Step) -> Any:
        return step.run(self.fun)

    # -- inside ----------------------------------------------------------------------------
    def _trace(
        self, static: Static, values: list, other: list
    ) -> tuple[Info, list, list, list, list]:
        """Runs the user function on rebuilt objects.

        Returns ``(info, new_values, out_other, value_out_axes, other_out_axes)``: the axis of
        every returned state value and of every other output leaf (None where a node stood).
        """
        step = Step(static.value, values, other)
        call, settings = step.call, step.settings
        value_axes, node_prefixes = settings.value_axes, settings.node_prefixes
        name = self.partition_name
        if name is not None:
            leaves = step.input_leaves
            for leaf_var, axis in zip(
                input_leaves(step.nodes) if leaves is None else leaves, value_axes
            ):
                if isinstance(leaf_var, Variable) and isinstance(axis, int):
                    remove_axis(leaf_var, axis, name, self.axis_metadata)
        out = self._call_fun(step)
        transform = self._transform
        check_output_types(self.fun, out, transform)
        step.check_tree_mode_output(transform, out)

        out_leaves = jax.tree_util.tree_leaves(out, is_leaf=is_graph_node)
        out_prefixes = broadcast_prefix(self.out_prefix, out, self._out_what, self._is_leaf)
        node_out = [p for p, x in zip(out_prefixes, out_leaves) if is_graph_node(x)]
        out_nodes = [x for x in out_leaves if is_graph_node(x)]
        # an input object (or an object reachable from one) returned as an output must keep
        # its axes
        reachable = {id(n) for n in step.built}
        check_not_captured(transform, out_nodes, step.built, call.graph_updates)
        if any(id(n) in reachable for n in out_nodes):
            checker = AliasChecker()
            for node, prefix in zip(step.nodes, node_prefixes):
                checker.add(node, prefix)
            for node, prefix in zip(out_nodes, node_out):
                if id(node) in reachable:
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
                    insert_axis(leaf, axis, name, self.axis_metadata)

        info, new_values, out_other = step.collect(
            out,
            every_input=self._every_input_for(call.graph_updates),
            before_walk=before if name is not None else None,
            annotate=leaf_axes,
        )
        if info.unchanged:
            value_out = [value_axes[i] for i in info.changed]
        else:
            value_out = list(info.annotation)
        node_slots = set(info.out_pos)
        other_out = [None if i in node_slots else a for i, a in enumerate(out_prefixes)]
        return info, new_values, out_other, value_out, other_out


class VmapWrapped(MappedWrapped):
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
        graph: bool | None = None,
        graph_updates: bool | None = None,
    ):
        check_not_bound_method(fun, "vmap")
        check_prefix(in_axes, "in_axes", "vmap", graph, graph_updates)
        check_prefix(out_axes, "out_axes", "vmap", graph, graph_updates)
        self.graph, self.graph_updates = graph, graph_updates
        functools.update_wrapper(self, fun)
        self.fun = fun
        self.in_axes = self.in_prefix = in_axes
        self.out_axes = self.out_prefix = out_axes
        self.axis_name = axis_name
        self.axis_size = axis_size
        self.spmd_axis_name = spmd_axis_name
        self.partition_name = partition_name(transform_metadata)
        self.axis_metadata = other_fields(transform_metadata)

    def _pure(self, cells: tuple[list, list, list], static: Static, values: list, other: list):
        info, new_values, out_other, value_out, other_out = self._trace(static, values, other)
        cells[0][:] = value_out
        cells[1][:] = other_out
        cells[2][:] = [info]
        return Static(info), new_values, out_other

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs, value_axes, other_axes, static = self._prepare(args, kwargs, self.in_axes)
        vmap_kwargs: dict[str, Any] = dict(axis_name=self.axis_name, axis_size=self.axis_size)
        if self.spmd_axis_name is not None:
            vmap_kwargs["spmd_axis_name"] = self.spmd_axis_name
        # out_axes for the state leaves are known only once the function is traced: the
        # pure function fills these lists, which jax.vmap reads after tracing.
        cells: tuple[list, list, list] = ([], [], [])
        run = jax.vmap(
            functools.partial(self._pure, cells),
            in_axes=(None, list(value_axes), other_axes),
            out_axes=(None, cells[0], cells[1]),
            **vmap_kwargs,
        )
        try:
            info, values, out_other = run(static, inputs.values, inputs.other)
        except ValueError as error:
            raise _name_the_state_leaf(error, cells[2], inputs) from None
        return apply_outputs(inputs, info.value, values, out_other)


_BATCHED_STATE = re.compile(
    r"at vmap out_axes\[1\]\[(\d+)\], (got axis spec None but output .*)", re.S
)


def _name_the_state_leaf(error: ValueError, info_cell: list, inputs: Any) -> ValueError:
    """JAX's 'got axis spec None but output was batched' names a position in refax's flat list
    of state leaves; this names the Variable (by path) a broadcast axis was given to."""
    match = _BATCHED_STATE.search(str(error))
    if match is None or not info_cell:
        return error
    info, k = info_cell[0], int(match.group(1))
    if info.unchanged:
        if k >= len(info.changed):
            return error
        i = info.changed[k]
        leaf, path = inputs.walk.leaves[i], inputs.walk.paths[i]
    else:
        if k >= len(info.paths):
            return error
        leaf, path = None, info.paths[k][1:]
    kind = type(leaf).__name__ if leaf is not None else "state"
    where = "/".join(map(str, path[1:])) or str(path[0])
    return ValueError(
        f"at vmap state {kind} '{where}', {match.group(2).rstrip().rstrip('.')}. The {kind} is "
        "broadcast "
        "(axis None in in_axes / StateAxes) but the function gave it a value that differs "
        "across the mapped axis; map it (an int axis) or keep its update independent of the "
        "mapped inputs."
    )


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
    """Lifted ``jax.vmap``: maps ``f`` over an axis of its arguments, which may hold objects.

    An object argument is mapped like a pytree of its Variables: with axis 0, each lane sees
    the object holding one slice of every Variable; with ``None`` the object is broadcast; a
    :class:`StateAxes` picks the axis per kind of Variable. Updates made inside (new Variable
    values, and in graph mode new or deleted attributes) propagate back to the caller's
    objects, mapped Variables stacked along their axis (a broadcast Variable may only be
    given a value that is the same in every lane). Objects created inside come back
    stacked along their ``out_axes`` entry, which vectorises initialisation (an ensemble of
    models). Usable as ``@nnx.vmap``, ``@nnx.vmap(...)`` or ``nnx.vmap(f, ...)``, also on
    methods in a class body.

    Args:
      f: the function; omit it to use ``nnx.vmap(...)`` as a decorator.
      in_axes: a prefix of the positional arguments: an int (mapped over that axis),
        ``None`` (broadcast) or, for an object, a :class:`StateAxes`. Keyword arguments are
        mapped over axis 0.
      out_axes: a prefix of the output, likewise; objects created inside are stacked on
        their axis.
      axis_name: a name for the mapped axis, for collectives such as ``jax.lax.psum``.
      axis_size: the size of the mapped axis (needed when no argument is mapped).
      spmd_axis_name: as for ``jax.vmap``.
      transform_metadata: ``{nnx.PARTITION_NAME: name}`` removes the mapped axis from the
        Variables' sharding names inside and inserts ``name`` at their output axis outside.
      graph: ``False`` selects tree mode: objects are handled as pytrees and a shared
        reference among the arguments is an error. None reads ``nnx.set_graph_mode``.
      graph_updates: ``False`` propagates only Variable values, not structural changes.
        None reads ``nnx.set_graph_updates``.

    Returns:
      The vectorised function.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> @nnx.split_rngs(splits=4)
      ... @nnx.vmap(in_axes=0, out_axes=0)
      ... def create(rngs):
      ...   return nnx.Linear(2, 3, rngs=rngs)
      >>> ensemble = create(nnx.Rngs(0))
      >>> ensemble.kernel.shape
      (4, 2, 3)
      >>> @nnx.vmap(in_axes=(0, None))
      ... def forward(model, x):
      ...   return model(x)
      >>> forward(ensemble, jnp.ones((5, 2))).shape
      (4, 5, 3)
      >>> def scale(model, s):
      ...   model.kernel.value = model.kernel.value * s
      >>> nnx.vmap(scale)(ensemble, jnp.zeros(4))
      >>> float(jnp.abs(ensemble.kernel.value).sum())
      0.0
    """
    kwargs = dict(
        in_axes=in_axes,
        out_axes=out_axes,
        axis_name=axis_name,
        axis_size=axis_size,
        spmd_axis_name=spmd_axis_name,
        transform_metadata=transform_metadata,
        graph=graph,
        graph_updates=graph_updates,
    )
    if f is None:
        return lambda fn: VmapWrapped(fn, **kwargs)
    return VmapWrapped(f, **kwargs)
