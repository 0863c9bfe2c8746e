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

import contextlib
import functools
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental.layout import Format
from jax.sharding import NamedSharding, PartitionSpec

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
def _eval_shape(fn: Callable[[], Any], graph: bool | None) -> Any:
    try:
        from refax._transforms._eval_shape import eval_shape
    except ImportError:  # pragma: no cover - fallback while nnx.eval_shape is not available
        return _eval_shape_fallback(fn)
    if graph is None:
        return eval_shape(fn)
    return eval_shape(fn, graph=graph)


def _eval_shape_fallback(fn: Callable[[], Any]) -> Any:
    from refax._graph import merge, split

    box: list[Any] = []

    def pure() -> Any:
        graphdef, state = split(fn())
        box.append(graphdef)
        return state

    state = jax.eval_shape(pure)
    return merge(box[0], state)


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
        abs_model = _eval_shape(init_fn, graph)
        from refax._graph import split

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
    from refax._graph import map as graph_map

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


def _shard_new_variable(variable: Variable, kwargs: Mapping[str, Any]) -> None:
    """``Variable.__init__`` hook, called when the metadata has ``out_sharding``.

    ``kwargs`` are the constructor's keyword arguments: an ``eager_sharding`` given there wins;
    otherwise a ``False`` from the metadata (e.g. via ``with_metadata``) wins, and a default
    ``True`` defers to :func:`using_eager_sharding` (the resolved value is stored back).
    """
    meta = variable._var_metadata
    eager = meta.get("eager_sharding", True)
    if eager and "eager_sharding" not in kwargs and not _EAGER.stack[-1]:
        eager = False
        variable._var_metadata = {**meta, "eager_sharding": False}
    if not eager:
        return
    value = variable._raw_value
    new = shard_value(value, meta["out_sharding"], meta.get("sharding_rules"), meta.get("mesh"))
    if new is not value:
        variable._raw_value = new
