"""Lift types: prefixes that say how the sub-states of one object are transformed.

JAX transforms take pytree prefixes (``in_axes``, ``in_shardings``, ``argnums``). An object is
one argument but holds many kinds of state, so refax adds prefix objects that map filters to
per-Variable settings:

* :class:`StateSharding` (``jit``, ``shard_map``): filter -> sharding or PartitionSpec,
* :class:`DiffState` (``grad``, ``value_and_grad``, ``custom_vjp``): which Variables of an
  argument are differentiated,
* :class:`StateAxes` (``vmap``, ``pmap``, ``scan``): filter -> axis, ``None`` or ``Carry``.

Example:
  >>> from refax import nnx
  >>> from jax.sharding import PartitionSpec as P
  >>> sharding = nnx.StateSharding({nnx.Param: P('model'), ...: P()})
  >>> sharding.filters
  (<class 'refax._variables.Param'>, Ellipsis)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax

from refax._config import resolve_modes
from refax._filters import to_predicate
from refax._graph._flatten import flatten, is_graph_node
from refax._object import Pytree
from refax._statelib import State
from refax._variables import Variable

__all__ = ["StateSharding", "DiffState", "StateAxes", "Carry", "PARTITION_NAME"]

# The transform_metadata key under which vmap/scan record the partition name of their axis.
PARTITION_NAME = "partition_name"


class LeafPrefix:
    """A prefix given to one object that resolves to a value per state leaf: ``lookup(path,
    leaf)`` is the value (axis, sharding, ...) of the leaf at ``path`` inside the object."""

    def lookup(self, path: tuple, leaf: Any) -> Any:
        raise NotImplementedError


class ObjectPrefix(LeafPrefix):
    """A prefix shaped like the object it describes (what ``nnx.prefix(..., graph=False)``
    returns): each state leaf's value is found at the same path in the prefix object; a
    value met on the way down (not a container) covers everything below it."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def lookup(self, path: tuple, leaf: Any) -> Any:
        node = self.obj
        for key in path:
            if isinstance(key, str) and hasattr(node, "__dict__") and key in vars(node):
                node = vars(node)[key]
            elif isinstance(node, (dict, list, tuple)) or hasattr(node, "__getitem__"):
                try:
                    node = node[key]
                except (KeyError, IndexError, TypeError):
                    raise ValueError(
                        f"The prefix object has no entry at '{'.'.join(map(str, path))}'."
                    ) from None
            else:
                return node
        return node

    def __eq__(self, other: object) -> bool:
        return type(other) is ObjectPrefix and other.obj is self.obj  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return id(self.obj)


class _FilterMap(LeafPrefix):
    """An ordered filter -> value mapping; the first matching filter wins."""

    def __init__(self, mapping: Mapping[Any, Any] | tuple[tuple[Any, Any], ...]):
        self._state: Any = None
        if isinstance(mapping, State):  # keyed by path like the object's state, not filters
            self._state = mapping
            mapping = {_StatePath(mapping): None}
        items = tuple(mapping.items()) if isinstance(mapping, Mapping) else tuple(mapping)
        self._items = items
        self._predicates = tuple(to_predicate(f) for f, _ in items)

    @property
    def filters(self) -> tuple[Any, ...]:
        return tuple(f for f, _ in self._items)

    def items(self) -> tuple[tuple[Any, Any], ...]:
        return self._items

    def values(self) -> tuple[Any, ...]:
        return tuple(v for _, v in self._items)

    def keys(self) -> tuple[Any, ...]:
        return self.filters

    def get(self, key: Any, default: Any = None) -> Any:
        """The value given for the filter ``key`` (``default`` when it has none)."""
        return next((v for f, v in self._items if f == key), default)

    def map_prefix(self, path: tuple, variable: Any) -> Any:
        """The value for the Variable ``variable`` found at ``path`` (what a transform gives
        that state leaf)."""
        return self.lookup(path, variable)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.filters)

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, path: tuple, leaf: Any) -> Any:
        """The value of the first filter matching ``(path, leaf)``.

        Raises:
          ValueError: when no filter matches, naming the path.
        """
        if self._state is not None:
            value = leaf_value(self._state, path, leaf, _MISSING)
            if value is not _MISSING:
                return value
        else:
            for pred, (_, value) in zip(self._predicates, self._items):
                if pred(path, leaf):
                    return value
        raise ValueError(
            f"{type(self).__name__}: no filter matches the {type(leaf).__name__} at "
            f"'{'.'.join(map(str, path))}'. Add a catch-all entry `...: value`."
        )

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._items == other._items  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._items))

    def __repr__(self) -> str:
        inner = ", ".join(f"{_name(f)}: {v!r}" for f, v in self._items)
        return f"{type(self).__name__}({{{inner}}})"


_MISSING: Any = object()


class _StatePath:
    """The one 'filter' of a prefix made from a State: the paths the State has."""

    __slots__ = ("state",)

    def __init__(self, state: Any):
        self.state = state

    def __call__(self, path: tuple, leaf: Any) -> bool:
        return leaf_value(self.state, path, leaf, _MISSING) is not _MISSING

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _StatePath) and other.state is self.state

    def __hash__(self) -> int:
        return id(self.state)

    def __repr__(self) -> str:
        return f"State{sorted(map(str, getattr(self.state, '_mapping', {})))}"


def _name(f: Any) -> str:
    return f.__name__ if isinstance(f, type) else repr(f)


class StateSharding(_FilterMap):
    """Per-Variable shardings for one object argument of ``jit`` / ``shard_map``.

    An object is a single argument but holds Variables of many kinds and shapes, which often
    need different layouts. Given as the object's entry of ``in_shardings`` /
    ``out_shardings`` (``nnx.jit``) or ``in_specs`` / ``out_specs`` (``nnx.shard_map``), a
    ``StateSharding`` gives each Variable of the object the sharding (or ``PartitionSpec``)
    of the first filter that matches it; a Variable that no filter matches is an error, so
    end with a catch-all ``...`` entry.

    Args:
      mapping: an ordered mapping ``{filter: sharding}`` (or a sequence of such pairs);
        filters are Variable types, path filters such as ``nnx.PathContains``, ``...`` and
        the other ``nnx`` filters. A ``State`` of shardings, shaped like the object's state,
        is accepted too.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> from refax import nnx
      >>> n = jax.device_count()
      >>> mesh = Mesh(jax.devices(), ('model',))
      >>> sharding = nnx.StateSharding({nnx.PathContains('kernel'): P(None, 'model'),
      ...                               ...: P('model')})
      >>> @nnx.shard_map(mesh=mesh, in_specs=(sharding, P()), out_specs=P(None, 'model'))
      ... def forward(model, x):
      ...   assert model.kernel.shape == (2, 2)  # this device's block of columns
      ...   return model(x)
      >>> model = nnx.Linear(2, 2 * n, rngs=nnx.Rngs(0))
      >>> forward(model, jnp.ones((1, 2))).shape == (1, 2 * n)
      True
    """

    @property
    def shardings(self) -> tuple[Any, ...]:
        """The shardings, in the order of :attr:`filters`."""
        return self.values()


class StateAxes(_FilterMap):
    """Per-Variable axes (int, ``None`` to broadcast, or ``Carry``) for vmap/pmap/scan.

    Given as an object's entry of ``in_axes`` / ``out_axes`` (``nnx.vmap``, ``nnx.pmap``,
    ``nnx.scan``), a ``StateAxes`` gives each Variable of the object the axis of the first
    filter that matches it: an int maps (or scans) the Variable over that axis, ``None``
    broadcasts it, and ``nnx.Carry`` (``nnx.scan`` only) carries it from step to step. A
    Variable that no filter matches is an error, so end with a catch-all ``...`` entry.

    Args:
      mapping: an ordered mapping ``{filter: axis}`` (or a sequence of such pairs); filters
        are Variable types, path filters such as ``nnx.PathContains``, ``...`` and the other
        ``nnx`` filters.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> class Model(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(3))
      ...     self.count = nnx.BatchStat(jnp.zeros(4))  # one entry per lane
      >>> axes = nnx.StateAxes({nnx.BatchStat: 0, ...: None})
      >>> @nnx.vmap(in_axes=(axes, 0))
      ... def step(model, x):
      ...   model.count += x.sum()
      ...   return model.w * x
      >>> model = Model()
      >>> step(model, jnp.arange(12.0).reshape(4, 3)).shape
      (4, 3)
      >>> model.count.value
      Array([ 3., 12., 21., 30.], dtype=float32)
    """

    @property
    def axes(self) -> tuple[Any, ...]:
        """The axes, in the order of :attr:`filters`."""
        return self.values()


class _CarryType:
    """``nnx.Carry``: marks the carried argument or output of ``nnx.scan``.

    In ``in_axes`` / ``out_axes`` of :func:`nnx.scan <refax.scan>`, ``nnx.Carry`` marks the
    argument (and the output) passed from one step to the next rather than scanned over; it
    may appear at most once on each side. Inside a :class:`StateAxes` it carries the matching
    Variables of an object. ``nnx.Carry`` is a single constant; it takes no arguments.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      ... def total(acc, x):
      ...   return acc + x
      >>> total(0.0, jnp.arange(4.0))
      Array(6., dtype=float32)
    """

    _instance: _CarryType | None = None

    def __new__(cls) -> _CarryType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "Carry"

    def __reduce__(self):
        return (_CarryType, ())


Carry = _CarryType()


class DiffState:
    """Differentiate argument ``argnum`` with respect to the Variables matching ``filter``.

    An entry of ``argnums`` for ``nnx.grad`` / ``nnx.value_and_grad`` (and of
    ``nondiff_argnums`` for ``nnx.custom_vjp``) that picks which Variables of an object
    argument are differentiated; a plain int picks its ``Param`` s. The other Variables are
    passed as non-differentiated inputs, and their updates still propagate out. Only in
    graph mode with graph updates (the defaults).

    Args:
      argnum: the position of the argument.
      filter: the Variables to differentiate (a Variable type, a path filter such as
        ``nnx.PathContains``, or any other ``nnx`` filter).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> nnx.DiffState(0, nnx.Param)
      DiffState(argnum=0, filter=Param)
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> only_bias = nnx.DiffState(0, nnx.PathContains('bias'))
      >>> grads = nnx.grad(lambda m, x: m(x).sum(), argnums=only_bias)(model, jnp.ones((3, 2)))
      >>> 'kernel' in grads, grads['bias'].value.tolist()
      (False, [3.0])
    """

    __slots__ = ("argnum", "filter")

    def __init__(self, argnum: int, filter: Any):
        self.argnum = argnum
        self.filter = filter

    def map_prefix(self, path: tuple, variable: Any) -> bool:
        """Whether the Variable ``variable`` at ``path`` is differentiated."""
        return bool(to_predicate(self.filter)(path, variable))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, DiffState)
            and self.argnum == other.argnum
            and self.filter == other.filter
        )

    def __hash__(self) -> int:
        return hash((self.argnum, self.filter))

    def __repr__(self) -> str:
        return f"DiffState(argnum={self.argnum}, filter={_name(self.filter)})"


# -- resolution of prefixes to per-leaf values -------------------------------------------
def check_prefix(
    prefix: Any, argname: str, transform: str, graph: bool | None, graph_updates: bool | None
) -> None:
    """Checks a transform's prefix argument (``in_axes``, ``argnums``, ``in_shardings``...)
    when the transform is made.

    Raises:
      ValueError: the prefix holds a Variable, or (in graph mode with graph updates) an
        object: a prefix describes arguments, it is not one (without graph updates objects
        are pytrees, and a prefix may have their shape); or it holds a ``StateAxes`` /
        ``StateSharding`` / ``DiffState`` while graph updates are off (those select
        Variables inside objects, which tree mode and ``graph_updates=False`` treat as
        plain pytrees).
    """
    graph, graph_updates = resolve_modes(graph, graph_updates)
    mappings = (_FilterMap, DiffState)
    leaves = jax.tree_util.tree_leaves(
        prefix, is_leaf=lambda x: isinstance(x, (Pytree, Variable, State, *mappings))
    )
    for leaf in leaves:
        if isinstance(leaf, State):
            continue  # a State of per-Variable values (e.g. nnx.get_named_sharding's)
        if isinstance(leaf, Variable):
            raise ValueError(
                f"Variables prefixes are not supported: nnx.{transform} got a "
                f"{type(leaf).__name__} in `{argname}`. Give the axis or sharding itself (an "
                "int, None, a sharding), or a StateAxes/StateSharding for an object's "
                "Variables."
            )
        if not graph_updates and not isinstance(leaf, mappings):
            continue  # objects are pytrees then, and may be prefixes shaped like them
        if isinstance(leaf, Pytree):
            raise ValueError(
                f"Graph nodes are not allowed as prefixes: nnx.{transform} got a "
                f"{type(leaf).__name__} in `{argname}`. A prefix gives one entry per argument "
                "(an int, None, a sharding, StateAxes/StateSharding/DiffState), not an object."
            )
        if isinstance(leaf, mappings) and not graph_updates:
            kind = type(leaf).__name__
            raise ValueError(
                f"`{argname}` cannot contain `{kind}` objects when `graph=False` or "
                f"`graph_updates=False`: nnx.{transform} then treats objects as plain pytrees, "
                f"so give a pytree prefix instead, or pass graph=True and graph_updates=True "
                f"(or use nnx.compat.{transform})."
            )


def arg_owners(inputs: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The top-level argument (position or keyword name) of every flat leaf of ``inputs``."""
    owners: list[Any] = []
    for i, a in enumerate(args):
        owners += [i] * len(jax.tree_util.tree_leaves(a, is_leaf=is_graph_node))
    for k in sorted(kwargs):  # tree_flatten orders dict keys
        owners += [k] * len(jax.tree_util.tree_leaves(kwargs[k], is_leaf=is_graph_node))
    return owners


def resolve_leaf_prefixes(inputs: Any, args: tuple, kwargs: dict, prefixes: Any) -> tuple:
    """One value per state leaf of ``inputs`` from a per-argument prefix.

    ``prefixes`` is one value for every argument, or a tuple with one entry per positional
    argument; each entry is a value (a sharding), a :class:`_FilterMap`, or a State / nested
    dict of values keyed like the object's state.
    """
    owners = arg_owners(inputs, args, kwargs)

    def node_prefix(i: int) -> Any:
        owner = owners[inputs.node_pos[i]]
        if isinstance(prefixes, (tuple, list)):
            return prefixes[owner] if isinstance(owner, int) and owner < len(prefixes) else None
        return prefixes

    walk = inputs.walk
    nodes = inputs.nodes
    if walk.num_refs or len({id(n) for n in nodes}) < len(nodes):
        _check_consistent(nodes, [node_prefix(i) for i in range(len(nodes))])
    return tuple(
        leaf_value(node_prefix(path[0]), path[1:], leaf)
        for leaf, path in zip(walk.leaves, walk.paths)
    )


class _Resolved(LeafPrefix):
    """A prefix read leaf by leaf through :func:`leaf_value` (for the aliasing check)."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: Any):
        self.prefix = prefix

    def lookup(self, path: tuple, leaf: Any) -> Any:
        return leaf_value(self.prefix, path, leaf)


def _check_consistent(nodes: tuple, prefixes: list) -> None:
    """A Variable reached through several arguments must get one value from every prefix.

    Raises:
      ValueError: ``Inconsistent aliasing detected.``, listing each occurrence.
    """
    checker = AliasChecker()
    for node, prefix in zip(nodes, prefixes):
        checker.add(node, _Resolved(prefix))


def leaf_value(prefix: Any, path: tuple, leaf: Any, missing: Any = None) -> Any:
    """The value ``prefix`` gives the state leaf at ``path`` (``missing`` when a State or
    dict prefix has no entry there)."""
    if isinstance(prefix, LeafPrefix):
        return prefix.lookup(path, leaf)
    if isinstance(prefix, Pytree):  # shaped like the object (nnx.prefix(..., graph=False))
        return ObjectPrefix(prefix).lookup(path, leaf)
    mapping = getattr(prefix, "_mapping", prefix)
    if isinstance(mapping, dict):
        node: Any = mapping
        for key in path:
            node = getattr(node, "_mapping", node)
            if not isinstance(node, dict):
                break  # a value above the leaf covers it
            if key not in node:
                return missing
            node = node[key]
        return node.get_value() if isinstance(node, Variable) else node
    return prefix


def shard_inside(x: Any, sharding: Any) -> Any:
    """Lays ``x`` out with ``sharding`` inside a traced function, whatever the mesh's axis
    types (a constraint for Auto axes, a reshard for Explicit ones)."""
    if sharding is None or x is None:
        return x
    try:
        return jax.lax.with_sharding_constraint(x, sharding)
    except AssertionError:  # every mesh axis is Explicit: constraints only assert there
        return jax.sharding.reshard(x, sharding)


def constrain_outputs(out_shardings: Any, info: Any, values: list, out_other: list):
    """Applies ``out_shardings`` to the function's outputs: the returned arrays and the state
    of objects created inside, never the updated state of the inputs.

    ``out_shardings`` is one sharding for everything here; per-Variable shardings of a
    returned object (``StateSharding`` or a State of shardings) are applied by ``nnx.jit`` to
    the object's Variables directly.
    """
    if isinstance(out_shardings, (jax.sharding.Sharding, jax.sharding.PartitionSpec)):
        out_other = [shard_inside(x, out_shardings) for x in out_other]
        if not info.unchanged:
            values = [
                shard_inside(x, out_shardings) if path[0] == 1 else x
                for x, path in zip(values, info.paths)
            ]
        return values, out_other
    raise NotImplementedError(
        "nnx.jit out_shardings takes one sharding for all outputs, or per-Variable shardings "
        "(StateSharding, or a State of shardings) when the function returns one new object; "
        "for other layouts constrain inside the function (jax.lax.with_sharding_constraint "
        "with nnx.get_partition_spec)."
    )


def leaf_axis(prefix: Any, path: tuple, leaf: Any) -> Any:
    """The axis (or spec) of one state leaf of an object whose prefix is ``prefix``."""
    if isinstance(prefix, LeafPrefix):
        return prefix.lookup(path, leaf)
    return prefix


class AliasChecker:
    """Records, per Variable, the axis each occurrence of its object gives it."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[Variable, list[tuple[str, Any]]]] = {}

    def add(self, node: Any, prefix: Any) -> None:
        """Adds one occurrence of ``node`` with ``prefix``; raises on an inconsistency."""
        walk = flatten(node, with_paths=True) if not isinstance(node, Variable) else None
        items = (
            [(p, leaf) for p, leaf in zip(walk.paths, walk.leaves)]
            if walk is not None
            else [((), node)]
        )
        for path, leaf in items:
            if not isinstance(leaf, Variable):
                continue
            axis = leaf_axis(prefix, path, leaf)
            entry = self.entries.setdefault(id(leaf), (leaf, []))
            entry[1].append((".".join(map(str, path)), axis))
        self.check()

    def check(self) -> None:
        bad = [
            (leaf, items)
            for leaf, items in self.entries.values()
            if len({_axis_key(a) for _, a in items}) > 1
        ]
        if bad:
            lines = ["Inconsistent aliasing detected. The following nodes have different prefixes:"]
            for leaf, items in bad:
                lines.append(f"Node: {type(leaf).__name__}")
                lines += [f"  {path}: {axis}" for path, axis in items]
            raise ValueError("\n".join(lines))


def _axis_key(a: Any) -> Any:
    return ("carry",) if isinstance(a, _CarryType) else a
