"""Sharding helpers: partition metadata on Variables, logical axis rules, eager sharding.

A Variable carries its sharding as ``out_sharding`` metadata: a tuple with one mesh axis name
(or logical axis name, or ``None``) per array dimension. ``sharding_names=`` and ``sharding=``
are accepted as older spellings of the same key. The helpers here read that metadata:

* :func:`with_partitioning` wraps an initializer so the Variable built from its output carries
  ``out_sharding`` (and an optional ``mesh``).
* :func:`get_partition_spec` / :func:`get_named_sharding` turn a tree of Variables (a Module,
  a State, ...) into the same tree of ``PartitionSpec`` / ``NamedSharding``; Variables stay
  boxes whose value is the spec, other array leaves get ``PartitionSpec()``.
* :func:`logical_axis_rules` binds logical axis names (``'embed'``) to mesh axes; the rules in
  effect (plus a Variable's own ``sharding_rules`` metadata) are applied whenever a spec is
  computed.
* :func:`get_abstract_model` and :func:`as_abstract` give abstract (``ShapeDtypeStruct``)
  states that carry shardings, for sharded checkpoint restore and ``jit`` shardings.

**Eager sharding.** A Variable created with ``out_sharding`` metadata while a mesh is known
(``jax.set_mesh(mesh)`` is active, or the Variable has ``mesh`` metadata) is sharded at once:
a concrete value is ``jax.device_put`` with ``NamedSharding(mesh, spec)``; a traced value
(inside ``jit``/``eval_shape``/``vmap``) is constrained with ``jax.sharding.reshard`` when all
mesh axes are ``Explicit`` and ``jax.lax.with_sharding_constraint`` when all are ``Auto``.
A mesh that mixes Explicit and Auto axes is a ``ValueError``. ``out_sharding`` may also be a
``PartitionSpec``, a ``NamedSharding`` (its own mesh is used) or a
``jax.experimental.layout.Format``. With no mesh the value is left as is. Switch it off per
Variable with ``eager_sharding=False`` metadata, or for every new Variable with
:func:`use_eager_sharding`. ``variable.sharding`` is the value's own sharding (e.g. a
``NamedSharding``), not the metadata: read the annotation as ``variable.out_sharding``.

The current mesh is read with ``jax.sharding.get_abstract_mesh()`` (set by ``jax.set_mesh``
and ``jax.sharding.use_abstract_mesh``; empty means no mesh) and, for ``device_put`` outside
``jit``, ``jax.sharding.get_mesh()`` (the concrete mesh of ``jax.set_mesh``; it raises inside
``jit``, where the abstract mesh is used). The legacy ``with mesh:`` context is not consulted.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from refax import nnx, spmd
  >>> mesh = jax.make_mesh((1,), ("data",))
  >>> init = spmd.with_partitioning(nnx.initializers.ones, ("data", None))
  >>> with jax.set_mesh(mesh):
  ...   model = nnx.Linear(2, 3, kernel_init=init, rngs=nnx.Rngs(0))
  >>> model.kernel[...].sharding.spec
  P('data', None)
  >>> specs = spmd.get_partition_spec(nnx.state(model))
  >>> specs["kernel"].get_value(), specs["bias"].get_value()
  (P('data', None), P())
  >>> with spmd.logical_axis_rules([("batch", "data")]):
  ...   spmd.get_partition_spec(nnx.Param(jnp.ones(2), out_sharding=("batch",))).get_value()
  P('data',)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import jax
from jax.sharding import NamedSharding, PartitionSpec

from refax._graph import map as graph_map
from refax._graph import split
from refax._sharding import LogicalRules as LogicalRules
from refax._sharding import (
    _to_spec,
    get_logical_axis_rules,
    logical_axis_rules,
    set_logical_axis_rules,
    shard_value,
    use_eager_sharding,
    using_eager_sharding,
)
from refax._transforms._eval_shape import eval_shape
from refax._transforms._prefix import PARTITION_NAME
from refax._variables import Variable, with_metadata

__all__ = [
    "PARTITION_NAME",
    "with_partitioning",
    "get_partition_spec",
    "get_var_pspec",
    "get_named_sharding",
    "get_abstract_model",
    "as_abstract",
    "abstract_with_sharding",
    "logical_axis_rules",
    "get_logical_axis_rules",
    "set_logical_axis_rules",
    "use_eager_sharding",
    "using_eager_sharding",
    "shard_value",
]

A = TypeVar("A")
F = TypeVar("F", bound=Callable[..., Any])


# -- annotations -----------------------------------------------------------------------------
def with_partitioning(
    initializer: F, sharding: Any, mesh: jax.sharding.Mesh | None = None, **metadata: Any
) -> F:
    """Wraps an initializer so the Variable built from its output carries sharding metadata.

    Args:
      initializer: any initializer ``(key, shape, dtype) -> array``.
      sharding: the ``out_sharding`` metadata: one mesh (or logical) axis name or ``None``
        per dimension.
      mesh: stored as ``mesh`` metadata; eager sharding uses it instead of the current mesh.
      **metadata: more metadata for the Variable.

    Example:
      >>> import jax
      >>> from refax import nnx, spmd
      >>> init = spmd.with_partitioning(nnx.initializers.zeros, (None, "model"))
      >>> p = nnx.Param(init(jax.random.key(0), (2, 4)))
      >>> p.out_sharding, p.mesh
      ((None, 'model'), None)
    """
    return with_metadata(initializer, out_sharding=sharding, mesh=mesh, **metadata)  # type: ignore[return-value]


def get_var_pspec(v: Variable) -> PartitionSpec | None:
    """The ``PartitionSpec`` of one Variable (``None`` when its value has no shape)."""
    meta = v._var_metadata
    sharding = meta.get("out_sharding")
    if sharding:
        return _to_spec(sharding, meta.get("sharding_rules"))
    if hasattr(v.get_value(), "shape"):
        return PartitionSpec()
    return None


def _is_variable(x: Any) -> bool:
    return isinstance(x, Variable)


def get_partition_spec(tree: A) -> A:
    """Returns ``tree`` with every Variable's value replaced by its ``PartitionSpec``.

    Variables keep their type and metadata (their value becomes the spec built from the
    ``out_sharding`` metadata, through the logical axis rules in effect; ``PartitionSpec()``
    without metadata). Bare array leaves become ``PartitionSpec()``, other leaves ``None``.
    Works on any pytree: States, Modules, dicts of arrays.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx, spmd
      >>> tree = {"w": nnx.Param(jnp.ones((2, 2)), out_sharding=("a", None)), "x": jnp.ones(3)}
      >>> specs = spmd.get_partition_spec(tree)
      >>> specs["w"].get_value(), specs["x"]
      (P('a', None), P())
    """

    def leaf(x: Any) -> Any:
        if isinstance(x, Variable):
            return x.replace(get_var_pspec(x))
        if hasattr(x, "shape"):
            return PartitionSpec()
        return None

    return jax.tree.map(leaf, tree, is_leaf=_is_variable)


def get_named_sharding(tree: A, mesh: jax.sharding.Mesh) -> A:
    """Like :func:`get_partition_spec`, with ``NamedSharding(mesh, spec)`` leaves."""
    specs = get_partition_spec(tree)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


# -- abstract models ---------------------------------------------------------------------------
def get_abstract_model(
    init_fn: Callable[[], Any], mesh: jax.sharding.Mesh, *, graph: bool | None = None
) -> tuple[Any, Any]:
    """Abstractly evaluates ``init_fn`` under ``mesh``; returns ``(graphdef, abstract_state)``.

    The state's values are ``jax.ShapeDtypeStruct`` carrying the ``NamedSharding`` of each
    Variable (from :func:`get_named_sharding`); nothing is allocated. Use it to restore a
    checkpoint straight into sharded arrays or to build ``jit`` shardings.

    Example:
      >>> import jax
      >>> from refax import nnx, spmd
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> init = spmd.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
      >>> gdef, abs_state = spmd.get_abstract_model(
      ...     lambda: nnx.Linear(2, 4, kernel_init=init, rngs=nnx.Rngs(0)), mesh)
      >>> k = abs_state["kernel"].get_value()
      >>> k.shape, k.sharding.spec
      ((2, 4), P(None, 'model'))
    """
    with jax.set_mesh(mesh):
        abs_model = eval_shape(init_fn, graph=graph)
        graphdef, abs_state = split(abs_model, graph=graph)
        shardings = get_named_sharding(abs_state, mesh)
        abs_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abs_state,
            shardings,
        )
    return graphdef, abs_state


def as_abstract(tree: A, graph: bool | None = None) -> A:
    """Attaches shardings to abstract Variables that only carry ``out_sharding`` metadata.

    Every Variable of ``tree`` whose value is a ``ShapeDtypeStruct`` (or any shaped value)
    without a sharding but with ``out_sharding`` metadata gets a new value
    ``ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))``, where ``mesh`` is
    the Variable's ``mesh`` metadata or else the current abstract mesh. Returns a new tree.

    Example:
      >>> import jax
      >>> from refax import nnx, spmd
      >>> mesh = jax.make_mesh((1,), ("a",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> abstract = jax.ShapeDtypeStruct((2, 4), "float32")
      >>> m = nnx.Dict(w=nnx.Param(abstract, out_sharding=(None, "a")))
      >>> with jax.set_mesh(mesh):
      ...   m = spmd.as_abstract(m)
      >>> m["w"].get_value().sharding.spec
      P(None, 'a')
    """

    def add_sharding(_path: Any, x: Any) -> Any:
        if not isinstance(x, Variable) or not x.has_metadata("out_sharding"):
            return x
        value = x.get_value()
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            return x
        if getattr(value, "sharding", None) is not None:
            return x
        mesh = x.get_metadata("mesh", None)
        if mesh is None:
            mesh = jax.sharding.get_abstract_mesh()
        sharding = NamedSharding(mesh, get_var_pspec(x))
        return x.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

    return graph_map(add_sharding, tree, graph=graph)


def abstract_with_sharding(tree: A, graph: bool | None = None) -> A:
    """Deprecated alias of :func:`as_abstract`."""
    warnings.warn(
        "abstract_with_sharding is deprecated; use as_abstract instead.",
        DeprecationWarning,
        stacklevel=2,
    )
    return as_abstract(tree, graph=graph)
