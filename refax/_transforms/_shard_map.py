"""``nnx.shard_map``: ``jax.shard_map`` over functions that take and return refax objects.

``in_specs``/``out_specs`` are pytree prefixes of the arguments/outputs, as for
``jax.shard_map``; an object takes a ``PartitionSpec`` (for all its Variables), ``None``
(replicated) or a :class:`StateSharding` mapping filters to specs. Inside, every Variable
holds its per-shard block; Variable updates (and structural changes) propagate out, each
updated Variable coming back with the spec it went in with. Objects created inside are
assembled from their blocks according to ``out_specs``.

The function is traced once: ``jax.shard_map`` reads ``out_specs`` after tracing, so the pure
function fills in the specs of the returned state (known only then) before JAX reads them.

Example (a one-device mesh):
  >>> import jax, jax.numpy as jnp
  >>> from jax.sharding import Mesh, PartitionSpec as P
  >>> from refax import nnx
  >>> from refax._transforms._shard_map import shard_map  # also nnx.shard_map
  >>> mesh = Mesh(jax.devices()[:1], ('x',))
  >>> model = nnx.Linear(2, 4, rngs=nnx.Rngs(0))
  >>> specs = nnx.StateSharding({nnx.PathContains('kernel'): P(None, 'x'), ...: P('x')})
  >>> @shard_map(mesh=mesh, in_specs=(specs, P()), out_specs=P(None, 'x'))
  ... def forward(model, x):
  ...   model.bias.value = model.bias.value + 1.0
  ...   return model(x)
  >>> forward(model, jnp.ones((3, 2))).shape
  (3, 4)
  >>> model.bias.value
  Array([1., 1., 1., 1.], dtype=float32)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import PartitionSpec

from refax._transforms._axes import is_spec_leaf
from refax._transforms._checks import check_not_bound_method
from refax._transforms._lift import Static, apply_outputs
from refax._transforms._vmap import MappedWrapped

__all__ = ["shard_map", "ShardMapWrapped"]

_REPLICATED = PartitionSpec()


def _state_spec(spec: Any) -> Any:
    """State always travels through shard_map: ``None`` means replicated."""
    return _REPLICATED if spec is None else spec


class ShardMapWrapped(MappedWrapped):
    """The callable returned by :func:`shard_map`."""

    _transform = "shard_map"
    _in_what, _out_what = "in_specs", "out_specs"
    _is_leaf = staticmethod(is_spec_leaf)
    _every_input = False  # only changed state comes back (without graph updates)

    def _every_input_for(self, updates: bool) -> bool:
        # with graph updates every input comes back, sharded by its in_spec (the caller's
        # Variables then hold global arrays laid out by in_specs)
        return updates

    def __init__(
        self,
        fun: Callable[..., Any],
        *,
        mesh: Any,
        in_specs: Any,
        out_specs: Any,
        axis_names: Any = frozenset(),
        check_vma: bool = True,
        graph: bool | None = None,
        graph_updates: bool | None = None,
    ):
        check_not_bound_method(fun, "shard_map")
        self.graph, self.graph_updates = graph, graph_updates
        functools.update_wrapper(self, fun)
        self.fun = fun
        self.mesh = mesh
        self.in_specs = self.in_prefix = in_specs
        self.out_specs = self.out_prefix = out_specs
        self.axis_names = frozenset(axis_names)
        self.check_vma = check_vma

    def _pure(self, cells: tuple[list, list], static: Static, values: list, other: list):
        info, new_values, out_other, value_out, other_out = self._trace(static, values, other)
        cells[0][:] = [_state_spec(s) for s in value_out]
        cells[1][:] = other_out
        return Static(info), new_values, out_other

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise TypeError(
                "nnx.shard_map: pass the arguments positionally (in_specs describes the "
                f"positional arguments); got keyword arguments {sorted(kwargs)}."
            )
        inputs, value_specs, other_specs, static = self._prepare(args, {}, self.in_specs)
        # the specs of the returned leaves are known once the function is traced: the pure
        # function fills these lists, which jax.shard_map reads after tracing.
        cells: tuple[list, list] = ([], [])
        run = jax.shard_map(
            functools.partial(self._pure, cells),
            mesh=self.mesh,
            in_specs=(_REPLICATED, [_state_spec(s) for s in value_specs], other_specs),
            out_specs=(_REPLICATED, cells[0], cells[1]),
            axis_names=self.axis_names,
            check_vma=self.check_vma,
        )
        info, values, out_other = run(static, inputs.values, inputs.other)
        return apply_outputs(inputs, info.value, values, out_other)


def shard_map(
    f: Callable[..., Any] | None = None,
    *,
    mesh: Any,
    in_specs: Any,
    out_specs: Any,
    axis_names: Any = frozenset(),
    check_vma: bool = True,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Lifted ``jax.shard_map``: runs ``f`` on per-device blocks of its arguments and objects.

    Each argument is cut into blocks over the ``mesh`` by its ``in_specs`` entry; for an
    object, every Variable is cut by the same ``PartitionSpec``, by a
    :class:`StateSharding` that picks a spec per kind of Variable, or kept whole (``None``,
    replicated). Inside, each Variable holds its device's block. Updates made inside (new
    Variable values, and in graph mode structural changes) propagate back to the caller's
    objects, each Variable reassembled with the spec it went in with. Objects created inside
    are assembled from their blocks by ``out_specs``.

    Args:
      f: the function; omit it to use ``nnx.shard_map(mesh=..., ...)`` as a decorator.
      mesh: the ``jax.sharding.Mesh`` (or ``AbstractMesh``) to map over.
      in_specs: a prefix of the positional arguments (keyword arguments are refused); an
        object takes a ``PartitionSpec``, ``None`` (replicated) or a :class:`StateSharding`.
      out_specs: a prefix of the output, likewise.
      axis_names: the mesh axes the function is manual over (default: all).
      check_vma: as for ``jax.shard_map`` (check that replicated outputs do not vary).
      graph: ``False`` selects tree mode: objects are handled as pytrees and a shared
        reference among the arguments is an error. None reads ``nnx.set_graph_mode``.
      graph_updates: ``False`` propagates only Variable values (only the changed ones come
        back), not structural changes. With graph updates every input Variable comes back,
        so the caller's Variables then hold global arrays laid out by their ``in_specs``.
        None reads ``nnx.set_graph_updates``.

    Returns:
      The sharded function.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> from refax import nnx
      >>> class Model(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.linear = nnx.Linear(2, 3, rngs=rngs)
      ...     self.calls = nnx.BatchStat(jnp.array(0))
      ...   def __call__(self, x):
      ...     self.calls += 1
      ...     return self.linear(x)
      >>> mesh = Mesh(jax.devices(), ('data',))
      >>> @nnx.shard_map(mesh=mesh, in_specs=(P(), P('data')), out_specs=P('data'))
      ... def forward(model, x):
      ...   return model(x)
      >>> n = jax.device_count()
      >>> model = Model(nnx.Rngs(0))
      >>> y = forward(model, jnp.ones((2 * n, 2)))
      >>> y.shape == (2 * n, 3), int(model.calls.value)
      (True, 1)
    """
    kwargs = dict(
        mesh=mesh,
        in_specs=in_specs,
        out_specs=out_specs,
        axis_names=axis_names,
        check_vma=check_vma,
        graph=graph,
        graph_updates=graph_updates,
    )
    if f is None:
        return lambda fn: ShardMapWrapped(fn, **kwargs)
    return ShardMapWrapped(f, **kwargs)
