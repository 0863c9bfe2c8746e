"""``nnx.pmap``: ``jax.pmap`` over functions that take and return refax objects.

The prefixes work as for :func:`nnx.vmap <refax.vmap>`: in ``in_axes``/``out_axes`` an object
takes an int, ``None`` (broadcast) or a :class:`StateAxes`; Variable updates and structural
changes propagate out; objects created inside come back stacked on their output axis.

The function is traced once. ``jax.pmap`` (built on ``jax.jit`` and ``jax.shard_map``)
flattens ``out_axes`` when it is created, so the output axes of the state leaves, known only
after tracing, cannot be handed to it the way ``nnx.vmap`` does. Instead every output leaf
comes back mapped on axis 0 and its final axis travels out with the trace's static data (so a
cached compilation carries it too); outside, a leaf whose axis is ``None`` takes the copy of
the first device and an int axis is moved into place. The ``jax.pmap`` objects are cached per
input layout, so repeated calls reuse the compilation.

Example (one device is enough):
  >>> import jax, jax.numpy as jnp
  >>> from refax import nnx
  >>> from refax._transforms._pmap import pmap  # also nnx.pmap
  >>> class Counter(nnx.Module):
  ...   def __init__(self):
  ...     self.count = nnx.Variable(jnp.zeros((1,), jnp.int32))
  >>> @pmap(axis_name='d')
  ... def step(counter, x):
  ...   counter.count += 1
  ...   return jax.lax.psum(x, 'd')
  >>> c = Counter()
  >>> step(c, jnp.ones((1, 3)))
  Array([[1., 1., 1.]], dtype=float32)
  >>> c.count.value
  Array([1], dtype=int32)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from refax._transforms._axis_metadata import partition_name
from refax._transforms._checks import check_not_bound_method
from refax._transforms._lift import Static, Step, apply_outputs
from refax._transforms._masks import donation_masks, interleave, split_by_mask
from refax._transforms._static_args import as_tuple, extract_static, insert_static
from refax._transforms._vmap import MappedWrapped

__all__ = ["pmap", "PmapWrapped"]


def _place(x: Any, axis: Any) -> Any:
    """Moves the device axis (0) of a returned leaf to ``axis``; None keeps device 0's copy."""
    if axis is None:
        return x[0]
    return x if axis == 0 else jnp.moveaxis(x, 0, axis)


class PmapWrapped(MappedWrapped):
    """The callable returned by :func:`pmap`."""

    _transform = "pmap"
    _every_input = False  # unchanged state stays where it is (no copy to and from devices)

    def __init__(
        self,
        fun: Callable[..., Any],
        *,
        axis_name: Any = None,
        in_axes: Any = 0,
        out_axes: Any = 0,
        static_broadcasted_argnums: int | Iterable[int] = (),
        devices: Sequence[Any] | None = None,
        backend: str | None = None,
        axis_size: int | None = None,
        donate_argnums: int | Iterable[int] = (),
        transform_metadata: Mapping[str, Any] | None = None,
        graph: bool | None = None,
        graph_updates: bool | None = None,
    ):
        check_not_bound_method(fun, "pmap")
        self.graph, self.graph_updates = graph, graph_updates
        functools.update_wrapper(self, fun)
        self.fun = fun
        self.axis_name = axis_name
        self.in_axes = self.in_prefix = in_axes
        self.out_axes = self.out_prefix = out_axes
        self.static_broadcasted_argnums = as_tuple(static_broadcasted_argnums)
        self.devices = devices
        self.backend = backend
        self.axis_size = axis_size
        self.donate_argnums = as_tuple(donate_argnums)
        self.partition_name = partition_name(transform_metadata)
        self._pmaps: dict[tuple, Any] = {}  # input layout -> jax.pmap object

    def _call_fun(self, step: Step) -> Any:
        args, kwargs = insert_static(step.args, step.kwargs, step.settings.static_args)
        return self.fun(*args, **kwargs)

    def _pure(
        self,
        static: Static,
        dummy: Any,
        donated_values: list,
        kept_values: list,
        donated_other: list,
        kept_other: list,
    ):
        settings = static.value.settings
        values = interleave(settings.value_mask, donated_values, kept_values)
        other = interleave(settings.other_mask, donated_other, kept_other)
        info, new_values, out_other, value_out, other_out = self._trace(static, values, other)
        return Static((info, tuple(value_out), tuple(other_out))), new_values, out_other

    def _jax_pmap(self, in_axes: tuple, donate: bool) -> Any:
        key = (tuple(tuple(a) if isinstance(a, list) else a for a in in_axes), donate)
        run = self._pmaps.get(key)
        if run is None:
            if len(self._pmaps) >= 32:
                self._pmaps.pop(next(iter(self._pmaps)))
            run = self._pmaps[key] = jax.pmap(
                self._pure,
                axis_name=self.axis_name,
                in_axes=in_axes,
                out_axes=0,
                devices=self.devices,
                backend=self.backend,
                axis_size=self.axis_size,
                donate_argnums=(2, 4) if donate else (),
            )
        return run

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        n = len(args)
        static_nums = {i % n for i in self.static_broadcasted_argnums if -n <= i < n}
        donated = {i % n for i in self.donate_argnums if -n <= i < n} - static_nums
        in_axes = self.in_axes
        static_args: tuple = ()
        if static_nums:
            if isinstance(in_axes, (tuple, list)) and len(in_axes) == n:
                in_axes = tuple(a for i, a in enumerate(in_axes) if i not in static_nums)
            args, kwargs, static_args = extract_static(
                args, kwargs, tuple(sorted(static_nums)), (), "pmap"
            )
        # donate_argnums count every positional argument, static ones included (as jax.pmap)
        dyn_index = [i for i in range(n) if i not in static_nums]
        donate_dyn = tuple(j for j, i in enumerate(dyn_index) if i in donated)
        inputs, value_axes, other_axes, static = self._prepare(args, kwargs, in_axes, static_args)
        if donate_dyn:
            value_mask, other_mask = donation_masks(inputs, args, kwargs, donate_dyn, ())
        else:
            value_mask = (False,) * len(inputs.values)
            other_mask = (False,) * len(inputs.other)
        mapped = any(isinstance(a, int) for a in (*value_axes, *other_axes))
        if not mapped and self.axis_size is None:
            raise ValueError(
                "nnx.pmap needs at least one argument with a mapped axis, or axis_size."
            )
        # jax.pmap infers the axis size from a mapped argument: give it one when only
        # axis_size says how many devices to use (e.g. creating objects inside)
        dummy = None if mapped else jnp.zeros((self.axis_size,), jnp.int8)
        call = static.value
        settings = dataclasses.replace(call.settings, value_mask=value_mask, other_mask=other_mask)
        static = Static(dataclasses.replace(call, settings=settings))
        dv, kv = split_by_mask(value_mask, inputs.values)
        do, ko = split_by_mask(other_mask, inputs.other)
        dva, kva = split_by_mask(value_mask, value_axes)
        doa, koa = split_by_mask(other_mask, other_axes)
        run = self._jax_pmap(
            (None, None if mapped else 0, list(dva), list(kva), list(doa), list(koa)),
            bool(donate_dyn),
        )
        meta, values, out_other = run(static, dummy, dv, kv, do, ko)
        info, value_out, other_out = meta.value
        values = [_place(x, a) for x, a in zip(values, value_out)]
        out_other = [None if x is None else _place(x, a) for x, a in zip(out_other, other_out)]
        return apply_outputs(inputs, info, values, out_other)


def pmap(
    f: Callable[..., Any] | None = None,
    *,
    axis_name: Any = None,
    in_axes: Any = 0,
    out_axes: Any = 0,
    static_broadcasted_argnums: int | Iterable[int] = (),
    devices: Sequence[Any] | None = None,
    backend: str | None = None,
    axis_size: int | None = None,
    donate_argnums: int | Iterable[int] = (),
    global_arg_shapes: Any = None,
    transform_metadata: Mapping[str, Any] | None = None,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Lifted ``jax.pmap``: runs ``f`` on several devices at once, over objects too.

    The arguments are split along their ``in_axes`` across the devices, as in ``jax.pmap``;
    an object argument is split like a pytree of its Variables (axis 0), replicated
    (``None``), or per kind of Variable with a :class:`StateAxes`. Updates made on the
    devices (new Variable values, and structural changes) propagate back to the caller's
    objects: a mapped Variable comes back stacked along its axis, a replicated one takes the
    value of the first device. Objects created inside come back stacked along their
    ``out_axes`` entry. Usable as ``@nnx.pmap``, ``@nnx.pmap(...)`` or ``nnx.pmap(f, ...)``,
    also on methods in a class body.

    Args:
      f: the function; omit it to use ``nnx.pmap(...)`` as a decorator.
      axis_name: a name for the mapped axis, for collectives such as ``jax.lax.psum``.
      in_axes: a prefix of the arguments, as for :func:`nnx.vmap <refax.vmap>` (an int,
        ``None`` or, for an object, a :class:`StateAxes`).
      out_axes: a prefix of the output, likewise.
      static_broadcasted_argnums: positional arguments passed as static (hashable) values.
      devices, backend: as for ``jax.pmap``.
      axis_size: the number of devices; also lets a function without mapped arguments run
        (e.g. creating objects on every device).
      donate_argnums: positional arguments whose buffers (their Variables') are donated.
      global_arg_shapes: not supported by the installed JAX; must be ``None``.
      transform_metadata: ``{nnx.PARTITION_NAME: name}`` as for ``nnx.vmap``.
      graph: ``False`` selects tree mode: objects are pytrees, and an object or Variable
        reachable twice among the arguments is an error. ``None`` reads the default.
      graph_updates: ``False`` propagates only the values of the arguments' Variables, not
        structural changes. ``None`` reads the default.

    Returns:
      The parallel function.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from refax import nnx
      >>> class Model(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.linear = nnx.Linear(2, 3, rngs=rngs)
      ...     self.calls = nnx.BatchStat(jnp.array(0))
      ...   def __call__(self, x):
      ...     self.calls += 1
      ...     return self.linear(x)
      >>> @nnx.pmap(in_axes=(None, 0), axis_name='devices')
      ... def forward(model, x):
      ...   return jax.lax.pmean(model(x), 'devices')
      >>> n = jax.local_device_count()
      >>> model = Model(nnx.Rngs(0))
      >>> y = forward(model, jnp.ones((n, 4, 2)))
      >>> y.shape == (n, 4, 3), int(model.calls.value)
      (True, 1)
    """
    if global_arg_shapes is not None:
        raise ValueError(
            "nnx.pmap: global_arg_shapes is not supported (the installed jax.pmap has no such "
            "argument)."
        )
    kwargs = dict(
        axis_name=axis_name,
        in_axes=in_axes,
        out_axes=out_axes,
        static_broadcasted_argnums=static_broadcasted_argnums,
        devices=devices,
        backend=backend,
        axis_size=axis_size,
        donate_argnums=donate_argnums,
        transform_metadata=transform_metadata,
        graph=graph,
        graph_updates=graph_updates,
    )
    if f is None:
        return lambda fn: PmapWrapped(fn, **kwargs)
    return PmapWrapped(f, **kwargs)
