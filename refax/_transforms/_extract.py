"""Objects <-> pure trees for hand-written transforms, and prefixes computed from filters.

refax's own transforms walk their arguments jointly (``_lift.py``). The documented API also
offers the building blocks to write such code by hand, on top of the graph contexts
(``refax/_graph/_context.py``):

* :func:`to_tree` replaces every object (and Variable) in a pytree by a :class:`NodeStates`
  (its GraphDef and States, a pytree JAX can transform), sharing one node numbering so an
  object reached twice is split once; :func:`from_tree` rebuilds the objects.
* :func:`prefix` computes a prefix (``in_axes``, ...) for every state leaf of an object from a
  filter mapping or a function of the leaf's path; in graph mode the result is a
  :class:`TreeState` that refax's transforms read leaf by leaf.

Example:
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  >>> pure = nnx.to_tree((model, 1, {"again": model}))
  >>> type(pure[0]).__name__, len(nnx.to_flat_state(pure[2]["again"].states[0]))
  ('NodeStates', 0)
  >>> a, _, b = nnx.from_tree(pure)
  >>> a is b["again"]
  True
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax

from refax._config import graph_mode_default
from refax._filters import to_predicate
from refax._graph._context import flatten as graph_flatten
from refax._graph._context import merge_context, split_context
from refax._graph._flatten import is_graph_node
from refax._graph._graphdef import GraphDef
from refax._graph._refmap import RefMap
from refax._statelib import State, from_flat_state
from refax._transforms._axes import AliasChecker
from refax._transforms._prefix import LeafPrefix
from refax._variables import Variable

__all__ = [
    "NodeStates",
    "TreeState",
    "to_tree",
    "from_tree",
    "prefix",
    "clear_non_graph_nodes",
    "broadcast_prefix",
]


def _is_node_or_variable(x: Any) -> bool:
    return is_graph_node(x)


class NodeStates:
    """An object split for a transform: its GraphDef, its States and any metadata.

    A pytree whose children are the GraphDef (no leaves) and the States; ``metadata`` is
    static. ``from_prefixes`` builds the matching prefix (e.g. ``in_axes``), with no GraphDef.
    """

    __slots__ = ("_graphdef", "states", "metadata")

    def __init__(self, graphdef: GraphDef | None, states: tuple, metadata: Any = None):
        self._graphdef = graphdef
        self.states = tuple(states)
        self.metadata = metadata

    @property
    def graphdef(self) -> GraphDef:
        if self._graphdef is None:
            raise ValueError("This NodeStates holds prefixes, not a split object: no GraphDef.")
        return self._graphdef

    @property
    def state(self) -> Any:
        if len(self.states) != 1:
            raise ValueError(f"Expected exactly one State, this NodeStates has {len(self.states)}.")
        return self.states[0]

    @classmethod
    def from_split(
        cls, graphdef: GraphDef | None, state: Any, /, *states: Any, metadata: Any = None
    ) -> NodeStates:
        """What ``split`` returned, as a NodeStates."""
        return cls(graphdef, (state, *states), metadata)

    @classmethod
    def from_states(cls, state: Any, *states: Any) -> NodeStates:
        """States without a GraphDef."""
        return cls(None, (state, *states))

    @classmethod
    def from_prefixes(cls, prefixes: Any, /, *, metadata: Any = None) -> NodeStates:
        """A prefix for a NodeStates: one prefix per State (e.g. an axis per State)."""
        return cls(None, tuple(prefixes), metadata)

    def __repr__(self) -> str:
        return f"NodeStates(graphdef={self._graphdef!r}, states={self.states!r})"


jax.tree_util.register_pytree_node(
    NodeStates,
    lambda n: ((n._graphdef, n.states), n.metadata),
    lambda metadata, children: NodeStates(children[0], children[1], metadata),
)


class _Opaque:
    """Static data compared as always equal (a function carried through a prefix)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return type(other) is _Opaque

    def __hash__(self) -> int:
        return 0


class TreeState(LeafPrefix):
    """An object as a tree: its GraphDef and its nested State (a pytree of the State's
    leaves); what :func:`prefix` returns in graph mode, with the function that computed
    each leaf's prefix (``prefix_fn``), which transforms use to read a leaf's prefix."""

    __slots__ = ("graphdef", "state", "prefix_fn")

    def __init__(self, graphdef: GraphDef | None, state: Any, prefix_fn: Any = None):
        self.graphdef = graphdef
        self.state = state
        self.prefix_fn = prefix_fn if isinstance(prefix_fn, _Opaque) else _Opaque(prefix_fn)

    def replace(self, **kwargs: Any) -> TreeState:
        fields = {"graphdef": self.graphdef, "state": self.state, "prefix_fn": self.prefix_fn}
        fields.update(kwargs)
        return TreeState(**fields)

    def lookup(self, path: tuple, leaf: Any) -> Any:
        """The prefix of the state leaf at ``path`` of the object this describes."""
        fn = self.prefix_fn.value
        if fn is not None:
            return fn(path, leaf)
        node = self.state
        for key in path:
            node = node[key]
        return node

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return f"TreeState(graphdef={self.graphdef!r}, state={self.state!r})"


jax.tree_util.register_pytree_with_keys(
    TreeState,
    lambda t: (((jax.tree_util.GetAttrKey("state"), t.state),), (t.graphdef, t.prefix_fn)),
    lambda aux, children: TreeState(aux[0], children[0], aux[1]),
    lambda t: ((t.state,), (t.graphdef, t.prefix_fn)),
)


def broadcast_prefix(
    prefix: Any,
    tree: Any,
    prefix_is_leaf: Callable[[Any], bool] | None = None,
    tree_is_leaf: Callable[[Any], bool] | None = None,
) -> list[Any]:
    """One prefix value per leaf of ``tree``: ``prefix`` must be a prefix of its structure
    (JAX's rule for ``in_axes``)."""
    out: list[Any] = []

    def expand(p: Any, subtree: Any) -> None:
        n = jax.tree_util.tree_structure(subtree, is_leaf=tree_is_leaf).num_leaves
        out.extend([p] * n)

    jax.tree_util.tree_map(expand, prefix, tree, is_leaf=prefix_is_leaf)
    return out


def _split_default(ctx: Any, path: tuple, prefix: Any, node: Any) -> NodeStates:
    return NodeStates.from_split(*ctx.split(node))


def to_tree(
    tree: Any,
    /,
    *,
    prefix: Any = None,
    split_fn: Callable[[Any, tuple, Any, Any], Any] = _split_default,
    map_non_graph_nodes: bool = False,
    ctxtag: Hashable | None = None,
    check_aliasing: bool = True,
) -> Any:
    """Replaces every object and Variable of ``tree`` by ``split_fn(ctx, path, prefix, node)``
    (by default a :class:`NodeStates` of ``ctx.split(node)``), all split in one
    ``split_context(ctxtag)``: an object reached twice is split once, its other occurrences
    become references.

    Args:
      tree: a pytree holding objects.
      prefix: a prefix of ``tree`` (e.g. ``in_axes``): each node's is passed to ``split_fn``,
        and an object reached with two different prefixes is an error.
      split_fn: how to split one node.
      map_non_graph_nodes: apply ``split_fn`` to the other leaves too.
      ctxtag: the update context to record in (see ``update_context``).
      check_aliasing: check that aliased objects get consistent prefixes.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_node_or_variable)
    if prefix is None:
        prefixes = [None] * len(leaves)
    else:
        prefixes = broadcast_prefix(
            prefix,
            tree,
            prefix_is_leaf=lambda x: x is None or _is_node_or_variable(x),
            tree_is_leaf=_is_node_or_variable,
        )
    checker = AliasChecker() if prefix is not None and check_aliasing else None
    out = []
    with split_context(ctxtag) as ctx:
        for (keypath, leaf), p in zip(leaves, prefixes):
            path = _to_path(keypath)
            if _is_node_or_variable(leaf):
                if checker is not None:
                    checker.add(leaf, p)
                out.append(split_fn(ctx, path, p, leaf))
            elif map_non_graph_nodes:
                out.append(split_fn(ctx, path, p, leaf))
            else:
                out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def _merge_default(ctx: Any, path: tuple, prefix: Any, leaf: Any) -> Any:
    if not isinstance(leaf, NodeStates):
        raise ValueError(f"Expected a NodeStates at {path}, got {type(leaf).__name__}.")
    return ctx.merge(leaf.graphdef, *leaf.states)


def from_tree(
    tree: Any,
    /,
    *,
    prefix: Any = None,
    merge_fn: Callable[[Any, tuple, Any, Any], Any] = _merge_default,
    is_node_leaf: Callable[[Any], bool] = lambda x: isinstance(x, NodeStates),
    is_leaf: Callable[[Any], bool] = lambda x: isinstance(x, NodeStates),
    map_non_graph_nodes: bool = False,
    is_inner: bool | None = None,
    ctxtag: Hashable | None = None,
) -> Any:
    """Rebuilds the objects :func:`to_tree` replaced (``merge_fn``, by default
    ``ctx.merge`` of each :class:`NodeStates`), in one ``merge_context(ctxtag, is_inner)``:
    references resolve to the objects already rebuilt."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    if prefix is None:
        prefixes = [None] * len(leaves)
    else:
        prefixes = broadcast_prefix(prefix, tree, lambda x: x is None, is_leaf)
    out = []
    with merge_context(ctxtag, is_inner) as ctx:
        for (keypath, leaf), p in zip(leaves, prefixes):
            if map_non_graph_nodes or is_node_leaf(leaf):
                out.append(merge_fn(ctx, _to_path(keypath), p, leaf))
            else:
                out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def clear_non_graph_nodes(tree: Any) -> Any:
    """``tree`` with every leaf that is not an object or Variable replaced by None."""
    return jax.tree.map(
        lambda x: x if _is_node_or_variable(x) else None, tree, is_leaf=_is_node_or_variable
    )


def _to_path(keypath: tuple) -> tuple:
    """A JAX key path as a refax path (attribute names, dict keys, indices)."""
    out = []
    for entry in keypath:
        for attr in ("name", "key", "idx"):
            if hasattr(entry, attr):
                out.append(getattr(entry, attr))
                break
        else:
            out.append(str(entry))
    return tuple(out)


def prefix(
    node: Any,
    filter_map: Mapping[Any, Any] | Callable[[tuple, Any], Any],
    /,
    *,
    graph: bool | None = None,
) -> Any:
    """A prefix for ``node`` (e.g. its ``in_axes``): each state leaf replaced by its prefix.

    Args:
      node: an object, a Variable, or a pytree of them.
      filter_map: ``{filter: prefix}`` (filters tried in order, the first match wins) or a
        function ``(path, leaf) -> prefix``.
      graph: in tree mode (False) the result has the structure of ``node`` (objects are
        pytrees), usable with ``jax.vmap`` too; in graph mode each object becomes a
        :class:`TreeState` (objects reached twice are numbered once, as a graph transform
        sees them), which refax's transforms read leaf by leaf. None reads
        ``nnx.set_graph_mode``.

    Returns:
      ``node`` with each state leaf (Variable) replaced by its prefix value: in tree mode a
      pytree shaped like ``node``, in graph mode each object replaced by a
      :class:`TreeState`. Pass it (or put it inside a larger prefix) as ``in_axes``,
      ``in_shardings``, ... of a transform.

    Raises:
      ValueError: when no filter matches a leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
      >>> axes = nnx.prefix(bn, {nnx.Param: None, nnx.BatchStat: 0}, graph=False)
      >>> axes.scale, axes.mean
      (None, 0)
    """
    if graph is None:
        graph = graph_mode_default()
    if isinstance(filter_map, Mapping):
        predicates = tuple((to_predicate(f), value) for f, value in filter_map.items())
        filters = list(filter_map)

        def prefix_fn(path: tuple, leaf: Any) -> Any:
            for predicate, value in predicates:
                if predicate(path, leaf):
                    return value
            raise ValueError(
                f"No filter matched the {type(leaf).__name__} at path {path!r}; filters: "
                f"{filters}. Add a catch-all entry `...: value`."
            )

    else:
        prefix_fn = filter_map
    is_variable = lambda x: isinstance(x, Variable)  # noqa: E731
    if graph:
        ref_index = RefMap()

        def as_tree_state(x: Any) -> Any:
            if not _is_node_or_variable(x):
                return x
            graphdef, flat = graph_flatten(x, ref_index=ref_index, graph=True)
            state: Any = from_flat_state(flat) if flat.paths != ((),) else flat.leaves[0]
            return TreeState(graphdef, state, prefix_fn)

        node = jax.tree.map(as_tree_state, node, is_leaf=_is_node_or_variable)

    def apply(jax_path: tuple, leaf: Any) -> Any:
        path = _to_path(jax_path)
        if graph:
            path = tuple(k for k in path if k != "state")  # (TreeState's own field)
        return prefix_fn(path, leaf)

    return jax.tree_util.tree_map_with_path(apply, node, is_leaf=is_variable)


_ = State  # (re-exported names used in docs)
