"""Sharding a new value: logical axis rules, the eager-sharding switch, ``shard_value``.

The low level of :mod:`refax.spmd`, below the Variables: ``Variable.__init__`` shards a value
created with ``out_sharding`` metadata through :func:`shard_new_value` (eager sharding), which
needs only JAX, the logical axis rules and the current mesh. :mod:`refax.spmd` re-exports the
public names and builds the tree-level helpers (partition specs of a model, abstract models)
on top of the Variables and the graph. See :mod:`refax.spmd` for the rules of eager sharding.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental.layout import Format
from jax.sharding import NamedSharding, PartitionSpec

__all__ = [
    "logical_axis_rules",
    "get_logical_axis_rules",
    "set_logical_axis_rules",
    "use_eager_sharding",
    "using_eager_sharding",
    "shard_value",
    "shard_new_value",
]

F = TypeVar("F", bound=Callable[..., Any])

LogicalRules = Sequence[tuple[str, Any]]


# -- logical axis rules ----------------------------------------------------------------------
class _RulesState(threading.local):
    def __init__(self) -> None:
        self.rules: tuple[tuple[str, Any], ...] = ()


_RULES = _RulesState()


def set_logical_axis_rules(rules: LogicalRules) -> None:
    """Sets the logical -> mesh axis rules of this thread (``()`` clears them)."""
    _RULES.rules = tuple((name, target) for name, target in rules)


def get_logical_axis_rules() -> tuple[tuple[str, Any], ...]:
    """Returns the logical -> mesh axis rules in effect in this thread."""
    return _RULES.rules


@contextlib.contextmanager
def logical_axis_rules(rules: LogicalRules) -> Iterator[None]:
    """Binds logical axis names to mesh axes for the enclosed block (or decorated function).

    Args:
      rules: ``(logical_name, mesh_axes)`` pairs; ``mesh_axes`` is a mesh axis name, a tuple
        of them, or ``None`` (replicated).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx, spmd
      >>> p = nnx.Param(jnp.ones((2, 3)), out_sharding=("batch", "embed"))
      >>> with spmd.logical_axis_rules([("batch", "data"), ("embed", None)]):
      ...   spmd.get_partition_spec(p).get_value()
      P('data', None)
    """
    previous = _RULES.rules
    set_logical_axis_rules(rules)
    try:
        yield
    finally:
        _RULES.rules = previous


def _composite_rules(first: Any, second: Any) -> tuple[tuple[str, Any], ...]:
    if not second:
        return tuple(first or ())
    if not first:
        return tuple(second)
    merged = dict(first)
    for name, target in second:
        if name in merged and merged[name] != target:
            raise ValueError(
                f"Inconsistent logical axis annotations for {name!r}: "
                f"{merged[name]!r} vs {target!r}."
            )
        merged[name] = target
    return tuple(merged.items())


def _rename(sharding: Any, table: Mapping[Any, Any]) -> Any:
    """``sharding`` with its axis names mapped through ``table``, as a PartitionSpec (from a
    tuple or spec), NamedSharding or ``Format`` (kind kept)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, _rename(sharding.spec, table))
    if isinstance(sharding, Format):
        return Format(sharding.layout, _rename(sharding.sharding, table))
    return PartitionSpec(*(table.get(s, s) if isinstance(s, str) else s for s in sharding))


def _apply_rules(sharding: Any, local_rules: Any = None) -> Any:
    """``out_sharding`` metadata with the context rules and the Variable's own
    ``sharding_rules`` applied (tuples become PartitionSpecs)."""
    rules = _composite_rules(_RULES.rules, local_rules)
    return _rename(sharding, dict(rules))


def _to_spec(sharding: Any, local_rules: Any = None) -> PartitionSpec:
    """``out_sharding`` metadata (tuple, PartitionSpec, NamedSharding or ``Format``) ->
    PartitionSpec, with the context rules and the Variable's own ``sharding_rules`` applied."""
    renamed = _apply_rules(sharding, local_rules)
    if isinstance(renamed, Format):
        renamed = renamed.sharding
    if isinstance(renamed, NamedSharding):
        renamed = renamed.spec
    return renamed


def _mesh_of(sharding: Any) -> Any:
    if isinstance(sharding, Format):
        sharding = sharding.sharding
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


# -- eager sharding ----------------------------------------------------------------------------
class _EagerState(threading.local):
    def __init__(self) -> None:
        self.stack: list[bool] = [True]


_EAGER = _EagerState()


class use_eager_sharding:  # noqa: N801  (a function-like name, as in the reference API)
    """Sets whether new Variables with sharding metadata are sharded at creation.

    The setting applies at once (globally for this thread); used as a context manager it is
    undone on exit, used as a decorator it applies only while the function runs. A Variable's
    own ``eager_sharding`` metadata, when passed explicitly, wins over it.

    Example:
      >>> from refax import nnx, spmd
      >>> _ = spmd.use_eager_sharding(False)
      >>> spmd.using_eager_sharding()
      False
      >>> with spmd.use_eager_sharding(True):
      ...   spmd.using_eager_sharding()
      True
      >>> spmd.using_eager_sharding()
      False
      >>> _ = spmd.use_eager_sharding(True)
    """

    def __init__(self, value: bool, /):
        stack = _EAGER.stack
        self._prev = stack[-1]
        self._value = bool(value)
        stack[-1] = self._value

    @staticmethod
    def current_value() -> bool:
        return _EAGER.stack[-1]

    def __enter__(self) -> use_eager_sharding:
        return self

    def __exit__(self, *exc: Any) -> None:
        _EAGER.stack[-1] = self._prev

    def __call__(self, fn: F) -> F:
        _EAGER.stack[-1] = self._prev  # decorating does not change the current setting
        value = self._value

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _EAGER.stack.append(value)
            try:
                return fn(*args, **kwargs)
            finally:
                _EAGER.stack.pop()

        return wrapper  # type: ignore[return-value]


def using_eager_sharding() -> bool:
    """Returns whether new Variables with sharding metadata are sharded at creation."""
    return _EAGER.stack[-1]


def _current_mesh() -> Any:
    """The mesh of ``jax.set_mesh``: concrete outside ``jit``, abstract inside (or None)."""
    abstract = jax.sharding.get_abstract_mesh()
    if abstract.empty:
        return None
    try:
        concrete = jax.sharding.get_mesh()
    except ValueError:  # inside a jit trace only the abstract mesh is available
        return abstract
    return abstract if concrete.empty else concrete


def _is_shardable(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex))


def shard_value(value: Any, out_sharding: Any, sharding_rules: Any = None, mesh: Any = None) -> Any:
    """Shards ``value`` as ``out_sharding`` says, on ``mesh`` or the current mesh.

    ``out_sharding`` is a tuple of axis names, a ``PartitionSpec``, a ``NamedSharding`` (its
    own mesh wins) or a ``jax.experimental.layout.Format``; logical names are mapped through
    the rules in effect. Concrete values are ``jax.device_put``; traced ones go through
    ``jax.sharding.reshard`` (all mesh axes Explicit) or ``jax.lax.with_sharding_constraint``
    (all Auto). A mesh that mixes Explicit and Auto axes is a ``ValueError``. Returns
    ``value`` unchanged when ``out_sharding`` is empty, no mesh is known, or a leaf is not an
    array.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from refax import spmd
      >>> mesh = jax.make_mesh((1,), ("a",), axis_types=(jax.sharding.AxisType.Explicit,))
      >>> x = spmd.shard_value(jnp.ones((2, 2)), ("a", None), mesh=mesh)
      >>> x.sharding.spec
      P('a', None)
    """
    if not out_sharding:
        return value
    target = _apply_rules(out_sharding, sharding_rules)
    own_mesh = _mesh_of(target)
    if own_mesh is not None:
        mesh = own_mesh
    elif mesh is None:
        mesh = _current_mesh()
    if mesh is None:
        return value
    leaves = jax.tree.leaves(value)
    if not leaves or not all(_is_shardable(x) for x in leaves):
        return value
    explicit, auto = mesh.are_all_axes_explicit, mesh.are_all_axes_auto
    if not (explicit or auto):
        raise ValueError(
            "Sharding a Variable needs a mesh whose axes are all Explicit or all Auto; got axis "
            f"types {mesh.axis_types}. Pass eager_sharding=False to the Variable or use "
            "spmd.use_eager_sharding(False)."
        )
    traced = any(isinstance(x, jax.core.Tracer) for x in leaves)
    if isinstance(target, Format):
        if traced:
            return jax.lax.with_sharding_constraint(value, target)
        return jax.device_put(value, target)
    if isinstance(target, PartitionSpec) and explicit and len(leaves) == 1:
        # spell the spec at full rank, as ``reshard`` and explicit-mode ops do
        target = PartitionSpec(*target, *(None,) * (np.ndim(leaves[0]) - len(target)))
    sharding = target if isinstance(target, NamedSharding) else NamedSharding(mesh, target)
    if not traced and isinstance(mesh, jax.sharding.Mesh):
        return jax.device_put(value, sharding)
    if explicit:
        return jax.sharding.reshard(value, sharding)
    return jax.lax.with_sharding_constraint(value, sharding)


def shard_new_value(
    value: Any, meta: Mapping[str, Any], explicit: bool
) -> tuple[Any, dict[str, Any] | None]:
    """Eager sharding of a new Variable's value; ``Variable.__init__`` calls it when the
    metadata ``meta`` has ``out_sharding``.

    ``explicit`` says whether ``eager_sharding`` was given to the constructor: then it wins;
    otherwise a ``False`` in the metadata (e.g. via ``with_metadata``) wins, and a default
    ``True`` defers to :func:`using_eager_sharding`.

    Returns:
      ``(value, new_meta)``: the (possibly sharded) value, and the metadata with the resolved
      ``eager_sharding=False`` stored when the switch turned it off (``None`` when unchanged).
    """
    eager = meta.get("eager_sharding", True)
    if eager and not explicit and not _EAGER.stack[-1]:
        return value, {**meta, "eager_sharding": False}
    if not eager:
        return value, None
    new = shard_value(value, meta["out_sharding"], meta.get("sharding_rules"), meta.get("mesh"))
    return new, None
