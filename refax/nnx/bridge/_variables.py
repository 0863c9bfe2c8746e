"""How a Variable crosses the Linen boundary, and back.

Linen keeps variables in *collections* (``{'params': {...}, 'batch_stats': {...}}``) whose
leaves are raw arrays or *boxes* (``nn.Partitioned``, ``nn.LogicallyPartitioned``, any
``AxisMetadata``) that carry sharding annotations. refax keeps each value in a typed
:class:`~refax.Variable` with a metadata dict. The bridge maps one onto the other:

* the collection name is the Variable type (``'params'`` <-> ``Param``, ``'batch_stats'`` <->
  ``BatchStat``, any other name <-> the type :func:`refax.register_variable_name` gave it, or a
  new type made and registered on first sight);
* a Linen ``Partitioned`` box becomes ``out_sharding`` metadata (its ``names``), a
  ``LogicallyPartitioned`` one also ``sharding_rules``; the box's class is remembered (the
  ``linen_box`` metadata entry) so the value goes back to Linen in the same kind of box;
* a Variable with metadata of its own and no remembered box goes to Linen as :class:`NNXMeta`,
  a Linen box that keeps type and metadata (Linen unboxes it like any other; ``nn.vmap`` and
  ``nn.scan`` add and remove its partition axis);
* a Variable with default metadata goes to Linen as its raw value.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
from flax import linen as nn
from flax.core import meta as linen_meta

from refax import spmd
from refax._variables import (
    _DEFAULT_METADATA,
    _NAME_TO_TYPE,
    _TYPE_TO_NAME,
    Variable,
    VariableMetadata,
    register_variable_name,
    variable_name_from_type,
    variable_type_from_name,
)

__all__ = [
    "NNXMeta",
    "LINEN_BOX",
    "to_linen_var",
    "to_nnx_var",
    "linen_collection",
    "with_partitioning",
    "is_linen_leaf",
    "flatten_collections",
    "nest",
]

LINEN_BOX = "linen_box"
"""Metadata key under which a Variable remembers the Linen box class it came from."""


def _own_metadata(var: Variable) -> dict[str, Any]:
    """The Variable's metadata without the entries every fresh Variable has."""
    return {
        k: v
        for k, v in var.get_metadata().items()
        if k != LINEN_BOX and not (k in _DEFAULT_METADATA and _DEFAULT_METADATA[k] == v)
    }


class NNXMeta(linen_meta.AxisMetadata):
    """A Linen box holding a refax Variable's value, type and metadata.

    Linen code sees the value (``unbox``); the bridge turns it back into a Variable of the same
    type with the same metadata. ``nn.vmap`` / ``nn.scan`` insert or remove the transform's
    partition name in the ``out_sharding`` metadata, and ``nn.get_partition_spec`` reads it.

    Args:
      var_type: the Variable subclass (``Param``, ``BatchStat``, ...).
      value: the raw value.
      metadata: the Variable's metadata (without the defaults every Variable has).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from refax import nnx
      >>> from refax.nnx import bridge
      >>> box = bridge.NNXMeta(nnx.Param, jnp.ones((2, 3)), {"out_sharding": ("a", None)})
      >>> box.get_partition_spec() == jax.sharding.PartitionSpec("a", None)
      True
      >>> var = box.to_nnx_variable()
      >>> type(var).__name__, var.out_sharding
      ('Param', ('a', None))
    """

    __slots__ = ("var_type", "value", "metadata")

    def __init__(self, var_type: type[Variable], value: Any, metadata: Mapping[str, Any]):
        self.var_type = var_type
        self.value = value
        self.metadata = dict(metadata)

    def __repr__(self) -> str:
        return f"NNXMeta({self.var_type.__name__}, value={self.value!r}, metadata={self.metadata})"

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is NNXMeta
            and self.var_type is other.var_type
            and self.metadata == other.metadata
            and self.value is other.value
        )

    __hash__ = None  # type: ignore[assignment]

    def unbox(self) -> Any:
        """The raw value (what Linen code sees)."""
        return self.value

    def replace_boxed(self, val: Any) -> NNXMeta:
        """The same box around another value."""
        return NNXMeta(self.var_type, val, self.metadata)

    def _with_axes(self, axes: tuple | None) -> NNXMeta:
        meta = dict(self.metadata)
        meta["out_sharding"] = axes
        return NNXMeta(self.var_type, self.value, meta)

    def add_axis(self, index: int, params: dict[Any, Any]) -> NNXMeta:
        """Inserts the transform's partition name (or ``None``) at ``index`` of ``out_sharding``."""
        axes = self.metadata.get("out_sharding")
        if not axes:
            return self
        axes = list(axes)
        axes.insert(index, params.get(nn.PARTITION_NAME) if params else None)
        return self._with_axes(tuple(axes))

    def remove_axis(self, index: int, params: dict[Any, Any]) -> NNXMeta:
        """Removes the entry at ``index`` of ``out_sharding`` (the transform's axis)."""
        axes = self.metadata.get("out_sharding")
        if not axes:
            return self
        axes = list(axes)
        del axes[index]
        return self._with_axes(tuple(axes))

    def get_partition_spec(self) -> jax.sharding.PartitionSpec:
        """The ``PartitionSpec`` the metadata describes (logical rules applied)."""
        return spmd.get_var_pspec(self.to_nnx_variable()) or jax.sharding.PartitionSpec()

    def get_sharding(self, mesh: jax.sharding.Mesh) -> jax.sharding.Sharding:
        """The ``NamedSharding`` of :meth:`get_partition_spec` on ``mesh``."""
        return jax.sharding.NamedSharding(mesh, self.get_partition_spec())

    def to_nnx_variable(self) -> Variable:
        """A new Variable of the recorded type with the value and metadata."""
        return self.var_type(self.value, **self.metadata)


def _flatten_meta(box: NNXMeta):
    return ((jax.tree_util.GetAttrKey("value"), box.value),), (
        box.var_type,
        tuple(box.metadata.items()),
    )


def _unflatten_meta(aux: tuple, children: Iterable[Any]) -> NNXMeta:
    (value,) = children
    box = object.__new__(NNXMeta)
    box.var_type, box.value, box.metadata = aux[0], value, dict(aux[1])
    return box


jax.tree_util.register_pytree_with_keys(
    NNXMeta, _flatten_meta, _unflatten_meta, lambda b: ((b.value,), _flatten_meta(b)[1])
)


def is_linen_leaf(x: Any) -> bool:
    """True for what ends a path in Linen's variables: a box or anything but a mapping."""
    return isinstance(x, linen_meta.AxisMetadata) or not isinstance(x, Mapping)


def linen_collection(var_or_type: Variable | type[Variable]) -> str:
    """The Linen collection name of a Variable (or Variable type); registers new types.

    Example:
      >>> from refax import nnx
      >>> from refax.nnx import bridge
      >>> bridge.variables.linen_collection(nnx.BatchStat)
      'batch_stats'
    """
    typ = var_or_type if isinstance(var_or_type, type) else type(var_or_type)
    name = _TYPE_TO_NAME.get(typ)
    if name is not None:
        return name
    # a type of its own gets a collection of its own (``LoRAParam`` is not ``params``)
    if typ.__name__ not in _NAME_TO_TYPE:
        register_variable_name(typ.__name__, typ)
        return typ.__name__
    return variable_name_from_type(typ, allow_register=True)


def to_linen_var(var: Variable) -> Any:
    """A refax Variable as a Linen leaf: its remembered Linen box, :class:`NNXMeta`, or the raw
    value (when its metadata is the default).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> from refax.nnx import bridge
      >>> bridge.to_linen_var(nnx.Param(jnp.zeros(2)))
      Array([0., 0.], dtype=float32)
      >>> type(bridge.to_linen_var(nnx.Param(jnp.zeros(2), out_sharding=("a",)))).__name__
      'NNXMeta'
    """
    value = var.get_value()
    meta = var.get_metadata()
    box = meta.get(LINEN_BOX)
    if box is not None:
        if isinstance(box, type) and issubclass(box, nn.LogicallyPartitioned):
            return box(
                value,
                names=tuple(meta.get("out_sharding") or ()),
                mesh=meta.get("mesh"),
                rules=meta.get("sharding_rules"),
            )
        if isinstance(box, type) and issubclass(box, nn.Partitioned):
            return box(value, names=tuple(meta.get("out_sharding") or ()), mesh=meta.get("mesh"))
        if isinstance(box, linen_meta.AxisMetadata):  # any other box: its template, refilled
            return box.replace_boxed(value)
    own = _own_metadata(var)
    if own:
        return NNXMeta(type(var), value, own)
    return value


def to_nnx_var(collection: str, x: Any) -> Variable:
    """A Linen leaf of ``collection`` as a refax Variable (type from the collection name).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from refax.nnx import bridge
      >>> v = bridge.to_nnx_var("params", nn.Partitioned(jnp.ones((2, 2)), names=("a", "b")))
      >>> type(v).__name__, v.out_sharding
      ('Param', ('a', 'b'))
    """
    if isinstance(x, NNXMeta):
        return x.to_nnx_variable()
    typ = variable_type_from_name(collection, allow_register=True)
    if isinstance(x, nn.LogicallyPartitioned):
        meta: dict[str, Any] = {"out_sharding": tuple(x.names), "sharding_rules": x.rules}
        if x.mesh is not None:
            meta["mesh"] = x.mesh
        return typ(x.value, **meta, **{LINEN_BOX: type(x)})
    if isinstance(x, nn.Partitioned):
        meta = {"out_sharding": tuple(x.names)}
        if x.mesh is not None:
            meta["mesh"] = x.mesh
        return typ(x.value, **meta, **{LINEN_BOX: type(x)})
    if isinstance(x, linen_meta.AxisMetadata):
        return typ(x.unbox(), **{LINEN_BOX: x.replace_boxed(None)})
    return typ(x)


def flatten_collections(variables: Mapping[str, Any]) -> dict[tuple[str, tuple], Any]:
    """Linen variables -> ``{(collection, path): leaf}`` (boxes are leaves)."""
    out: dict[tuple[str, tuple], Any] = {}
    for col, tree in variables.items():
        stack: list[tuple[tuple, Any]] = [((), tree)]
        while stack:
            path, node = stack.pop()
            if is_linen_leaf(node):
                out[(col, path)] = node
            else:
                stack.extend(((*path, k), v) for k, v in node.items())
    return out


def nest(flat: Iterable[tuple[tuple, Any]]) -> dict[Any, Any]:
    """``[(path, leaf), ...]`` -> nested plain dicts."""
    root: dict[Any, Any] = {}
    for path, leaf in flat:
        d = root
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = leaf
    return root


def with_partitioning(
    fn: Callable[..., Any],
    names: tuple[str | None, ...],
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[..., VariableMetadata]:
    """Wraps an initializer so the value it makes is a Linen ``nn.Partitioned`` parameter.

    Inside a :class:`bridge.Module <refax.nnx.bridge.Module>` the Variable made from it carries
    ``out_sharding=names``, and Linen sees an ``nn.Partitioned`` box in the variables that
    ``init`` returns (so ``nn.get_partition_spec`` works on them).

    Args:
      fn: an initializer ``(key, shape, dtype) -> array``.
      names: one mesh (or logical) axis name, or ``None``, per dimension.
      mesh: an optional mesh recorded with the annotation.

    Returns:
      An initializer returning a ``VariableMetadata`` that Variables unwrap.

    Example:
      >>> import jax
      >>> from refax import nnx
      >>> from refax.nnx import bridge
      >>> init = bridge.with_partitioning(nnx.initializers.ones, ("in", "out"))
      >>> p = nnx.Param(init(jax.random.key(0), (2, 3)))
      >>> p.out_sharding, type(bridge.to_linen_var(p)).__name__
      (('in', 'out'), 'Partitioned')
    """
    extra: dict[str, Any] = {"out_sharding": tuple(names), LINEN_BOX: nn.Partitioned}
    if mesh is not None:
        extra["mesh"] = mesh

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> VariableMetadata:
        value = fn(*args, **kwargs)
        if isinstance(value, VariableMetadata):
            return VariableMetadata(value.raw_value, {**value.metadata, **extra})
        return VariableMetadata(value, dict(extra))

    return wrapped
