"""The lifting core shared by every transform: objects in, pure pytrees through JAX, objects out.

Every lifted transform follows one pattern:

1. **Outside** (:func:`split_inputs`): find the graph nodes (Objects, Variables) in the
   arguments, walk them jointly once (so sharing between arguments survives) into a GraphDef
   and a flat list of state leaves. The walk is cached per tuple of node identities and reused
   while the structure epoch and container snapshots are unchanged, so a repeated call costs a
   list comprehension over the Variables.
2. **Inside** the JAX transform (:func:`make_pure`): rebuild fresh objects from the traced
   leaves, call the user function, walk the inputs and outputs again, and return only the leaves
   that changed, plus static information about what happened (an :class:`Info`, which travels
   as pytree auxiliary data, so JAX caches it with the trace).
3. **Outside again** (:func:`apply_outputs`): if the structure did not change, write the changed
   values back into the cached Variables; otherwise rebuild the structure into the original
   objects in place (new attributes, deleted ones, new sharing) and build new output objects,
   keeping identity for nodes that were inputs.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax

from refax._graph._flatten import FlattenResult, flatten, snapshots_valid, unflatten
from refax._graph._graphdef import REF, GraphDef
from refax._object import Pytree
from refax._tracers import EPOCH
from refax._variables import Variable, _set_raw

_MISSING = object()


def is_node(x: Any) -> bool:
    return isinstance(x, (Pytree, Variable))


class Static:
    """Wraps a hashable value as a pytree with no leaves (static data through JAX)."""

    __slots__ = ("value", "_hash")

    def __init__(self, value: Any):
        self.value = value
        self._hash: int | None = None

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Static) and self.value == other.value)

    def __hash__(self) -> int:
        h = self._hash
        if h is None:
            h = self._hash = hash(self.value)
        return h


jax.tree_util.register_pytree_node(Static, lambda s: ((), s.value), lambda v, _: Static(v))


class Inputs:
    """The arguments of one call, split into graph state and everything else."""

    __slots__ = ("treedef", "other", "node_pos", "walk", "values", "nodes")

    def __init__(self, treedef, other, node_pos, walk, values, nodes=()):
        self.treedef = treedef  # of (args, kwargs) with graph nodes as leaves
        self.other = other  # the pytree leaves, None where a node stood
        self.node_pos = node_pos  # positions of the nodes among the leaves
        self.walk: FlattenResult = walk  # the joint walk of the nodes tuple
        self.values: list[Any] = values  # raw values of the walk's leaves
        self.nodes: tuple = nodes  # the argument objects, in order of node_pos

    @property
    def graphdef(self) -> GraphDef:
        return self.walk.graphdef


_LIFT_KEY = "lift"  # key prefix of lift walks in ObjectState.walks
_STATE_ATTR = "_pytree__state"


class _CachedWalk:
    """A cached joint walk of argument nodes, holding no reference to the arguments themselves
    (their slots in ``nodes`` are None), so caching never creates a reference cycle."""

    __slots__ = ("epoch", "walk", "root_index", "all_variables", "others")

    def __init__(self, epoch, walk, root_index, all_variables, others):
        self.epoch = epoch
        self.walk = walk
        self.root_index = root_index
        self.all_variables = all_variables
        self.others = others  # weak (or, for Variables, strong) references to nodes[1:]


def _root_index(graphdef: GraphDef) -> tuple[int, ...]:
    """The node index of each argument node (the root tuple's entries)."""
    return tuple(enc[1] if enc[0] == REF else enc[2] for enc in graphdef.root[1])


def _walk_nodes(nodes: tuple) -> tuple[FlattenResult, bool]:
    """The joint walk of ``nodes`` (cached on the first node while the structure holds) and
    whether every leaf is a Variable."""
    first = nodes[0] if nodes else None
    st = first.__dict__.get(_STATE_ATTR) if isinstance(first, Pytree) else None
    key = (_LIFT_KEY, *map(id, nodes[1:]))
    if st is not None and st.walks is not None:
        entry = st.walks.get(key)
        if (
            entry is not None
            and entry.epoch == EPOCH.value
            and (not entry.walk.snapshots or snapshots_valid(entry.walk.snapshots))
            and _same_roots(entry, nodes)
        ):
            return _restore(entry, nodes), entry.all_variables
    epoch = EPOCH.value
    walk = flatten(nodes, with_paths=True)
    all_vars = all(isinstance(leaf, Variable) for leaf in walk.leaves)
    if st is not None:
        if st.walks is None:
            st.walks = {}
        root_index = _root_index(walk.graphdef)
        kept_nodes = list(walk.nodes)
        for i in root_index:
            kept_nodes[i] = None
        kept = FlattenResult(walk.graphdef, None, kept_nodes, walk.leaves, walk.snapshots)
        kept.paths = walk.paths
        kept.num_refs = walk.num_refs
        walks = st.walks
        if len(walks) >= 8 and key not in walks:
            walks.pop(next(iter(walks)), None)
        others = tuple(_ref(n) for n in nodes[1:])
        walks[key] = _CachedWalk(epoch, kept, root_index, all_vars, others)
    return walk, all_vars


def _ref(node: Any) -> Any:
    try:
        return weakref.ref(node)
    except TypeError:  # Variables have no weakref slot: keep them (no cycle: they hold no node)
        return lambda node=node: node


def _same_roots(entry: _CachedWalk, nodes: tuple) -> bool:
    # The key holds the other arguments' ids; ids are reused after an object dies, so check
    # that the very same objects are still there.
    return all(r() is n for r, n in zip(entry.others, nodes[1:]))


def _restore(entry: _CachedWalk, nodes: tuple) -> FlattenResult:
    """The cached walk with the argument nodes put back (a shallow view, nodes list shared
    lazily: ``nodes_of`` fills the roots in when a caller needs the full list)."""
    walk = entry.walk
    view = FlattenResult(walk.graphdef, None, None, walk.leaves, walk.snapshots)
    view.paths = walk.paths
    view.num_refs = walk.num_refs
    view.nodes = _LazyNodes(walk.nodes, entry.root_index, nodes)
    return view


class _LazyNodes:
    """Index -> node for a cached walk whose argument nodes are stored as None."""

    __slots__ = ("kept", "root_index", "roots")

    def __init__(self, kept: list, root_index: tuple, roots: tuple):
        self.kept, self.root_index, self.roots = kept, root_index, roots

    def __getitem__(self, i: int) -> Any:
        node = self.kept[i]
        if node is None:
            return self.roots[self.root_index.index(i)]
        return node

    def __len__(self) -> int:
        return len(self.kept)


def _raw(leaf: Any) -> Any:
    return leaf._raw_value if isinstance(leaf, Variable) else leaf


def resolve_modes(graph: bool | None, graph_updates: bool | None) -> tuple[bool, bool]:
    """The effective (graph, graph_updates) flags: None reads the process-wide default; tree
    mode (graph=False) never propagates graph updates."""
    from refax._config import graph_mode_default, graph_updates_default

    graph = graph_mode_default() if graph is None else graph
    graph_updates = graph_updates_default() if graph_updates is None else graph_updates
    return graph, graph and graph_updates


def split_inputs(args: tuple, kwargs: dict, *, graph: bool | None = None) -> Inputs:
    """Step 1: separates graph nodes from the rest of the arguments and walks them.

    In tree mode (``graph=False``; ``None`` reads the ``set_graph_mode`` default) an object
    reachable twice is an error.
    """
    if graph is None:
        graph = resolve_modes(None, None)[0]
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs), is_leaf=is_node)
    node_pos = tuple(i for i, x in enumerate(leaves) if is_node(x))
    nodes = tuple(leaves[i] for i in node_pos)
    for i in node_pos:
        leaves[i] = None
    walk, all_vars = _walk_nodes(nodes)
    if not graph and walk.num_refs:
        raise ValueError(
            "Shared reference found in tree mode (graph=False): an object or Variable is "
            "reachable through more than one path in the arguments. Pass graph=True (graph "
            "mode keeps sharing) or remove the shared reference."
        )
    if all_vars:
        values = [leaf._raw_value for leaf in walk.leaves]
    else:
        values = [_raw(leaf) for leaf in walk.leaves]
    return Inputs(treedef, leaves, node_pos, walk, values, nodes)


class Info:
    """Static facts about one trace of the user function (hashable, cached by JAX)."""

    __slots__ = (
        "unchanged",
        "changed",
        "out_treedef",
        "out_pos",
        "out_refs",
        "graphdef",
        "map",
        "paths",
        "annotation",
    )

    def __init__(self, unchanged, changed, out_treedef, out_pos, out_refs, graphdef, node_map):
        self.unchanged: bool = unchanged
        self.changed: tuple[int, ...] = changed  # input leaves whose value changed
        self.out_treedef = out_treedef
        self.out_pos: tuple[int, ...] = out_pos
        self.out_refs: tuple[int, ...] = out_refs  # input node index of each output node
        self.graphdef: GraphDef | None = graphdef  # joint (inputs, outputs) graph if changed
        self.map: tuple[tuple[int, int], ...] = node_map  # joint index -> input index
        self.paths: tuple[tuple, ...] = ()  # paths of the joint leaves (structure changed)
        self.annotation: Any = None  # per-joint-leaf data a transform attached (e.g. axes)

    def _key(self) -> tuple:
        return (
            self.unchanged,
            self.changed,
            self.out_treedef,
            self.out_pos,
            self.out_refs,
            self.graphdef,
            self.map,
            self.annotation,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Info) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def rebuild_inputs(
    static: tuple, values: Sequence[Any], other: Sequence[Any]
) -> tuple[tuple, dict, tuple, list]:
    """Inside a transform: fresh objects from traced ``values`` and the other argument leaves.

    Returns ``(args, kwargs, nodes, built)``: the rebuilt arguments, the argument nodes and
    every node built, by index.
    """
    graphdef, treedef, node_pos = static[:3]
    built: list[Any] = []
    nodes = unflatten(graphdef, values, flat=True, nodes_out=built)
    leaves = list(other)
    for p, n in zip(node_pos, nodes):
        leaves[p] = n
    args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
    return args, kwargs, nodes, built


def collect_outputs(
    graphdef: GraphDef,
    in_values: Sequence[Any],
    nodes: tuple,
    built: list[Any],
    out: Any,
    *,
    all_values: bool = False,
    every_input: bool | tuple[bool, ...] = False,
    before_walk: Callable[[FlattenResult], None] | None = None,
    annotate: Callable[[FlattenResult], Any] | None = None,
    graph_updates: bool = True,
    input_leaves: Sequence[Any] | None = None,
) -> tuple[Info, list[Any], list[Any]]:
    """Inside a transform, after the user function: what changed, as (info, values, other).

    ``values`` holds the changed input leaves (structure unchanged) or every leaf of the joint
    (inputs, outputs) walk (structure changed; ``info.paths`` then gives their paths).
    ``all_values`` forces the latter; ``every_input`` returns every input leaf, changed or not
    (vectorising transforms must return each batched value), or those a mask selects.
    ``before_walk(joint)`` may edit
    Variable metadata (axis names) before the final walk. With ``graph_updates=False`` the
    structure of the inputs is left alone: only the values of the input leaves (the
    ``input_leaves`` the inputs were rebuilt with, followed by identity) propagate.
    """
    out_leaves, out_treedef = jax.tree_util.tree_flatten(out, is_leaf=is_node)
    out_pos = tuple(i for i, x in enumerate(out_leaves) if is_node(x))
    out_nodes = tuple(out_leaves[i] for i in out_pos)
    for i in out_pos:
        out_leaves[i] = None
    if before_walk is not None:
        before_walk(flatten((nodes, out_nodes), with_paths=True))
    joint = flatten((nodes, out_nodes), with_paths=True)
    in_enc, out_enc = joint.graphdef.root[1]
    n_in = graphdef.num_nodes
    out_refs = tuple(e[1] if e[0] == REF and e[1] < n_in else -1 for e in out_enc[1])
    if not graph_updates and input_leaves is not None:
        position = {id(n): i for i, n in enumerate(built)}
        refs = tuple(position.get(id(n), -1) for n in out_nodes)
        if -1 not in refs:
            new = [_raw(leaf) for leaf in input_leaves]
            changed = _changed(new, in_values, every_input)
            info = Info(True, changed, out_treedef, out_pos, refs, None, ())
            return info, [new[i] for i in changed], out_leaves
    # Unchanged means: same encoding, the very same objects at every node index (a swap of
    # two Variables keeps the encoding but not the identities), no new output objects, and
    # no raw-array attribute rebound (those are written back by rebuilding, below).
    unchanged = (
        not all_values
        and in_enc == graphdef.root
        and -1 not in out_refs
        and all(map(operator.is_, joint.nodes[:n_in], built))
    )
    if unchanged:
        in_leaves = joint.leaves[: graphdef.num_leaves]
        new = [_raw(leaf) for leaf in in_leaves]
        changed = _changed(new, in_values, every_input)
        if all(isinstance(in_leaves[i], Variable) for i in changed):
            info = Info(True, changed, out_treedef, out_pos, out_refs, None, ())
            return info, [new[i] for i in changed], out_leaves
    position = {id(n): i for i, n in enumerate(built)}
    node_map = tuple((j, position[id(n)]) for j, n in enumerate(joint.nodes) if id(n) in position)
    values = [_raw(leaf) for leaf in joint.leaves]
    info = Info(False, (), out_treedef, out_pos, out_refs, joint.graphdef, node_map)
    info.paths = tuple(joint.paths)
    if annotate is not None:
        info.annotation = tuple(annotate(joint))
    return info, values, out_leaves


def _changed(new: list, old: Sequence[Any], every_input: bool | tuple) -> tuple[int, ...]:
    """Indices of the input leaves to return: the changed ones, plus every one (True) or
    those a mask selects (e.g. donated buffers, which must all come back)."""
    if every_input is True:
        return tuple(range(len(new)))
    mask = every_input or ()
    return tuple(i for i, (a, b) in enumerate(zip(new, old)) if a is not b or (mask and mask[i]))


def make_pure(fun: Callable[..., Any]) -> Callable[..., Any]:
    """The function a JAX transform sees.

    ``pure(Static(static), values, other) -> (Static(info), new_values, out_other)``, where
    ``static = (graphdef, treedef, node_pos, extra)`` and the user function is called as
    ``fun(args, kwargs, extra)``.
    """

    def pure(
        static: Static, values: list[Any], other: list[Any]
    ) -> tuple[Static, list[Any], list[Any]]:
        graphdef = static.value[0]
        args, kwargs, nodes, built = rebuild_inputs(static.value, values, other)
        out = fun(args, kwargs, static.value[3])
        info, new_values, out_other = collect_outputs(graphdef, values, nodes, built, out)
        return Static(info), new_values, out_other

    return pure


def static_of(inputs: Inputs, extra: Any = None) -> Static:
    return Static((inputs.graphdef, inputs.treedef, inputs.node_pos, extra))


def apply_outputs(inputs: Inputs, info: Info, values: Sequence[Any], out_other: list[Any]) -> Any:
    """Step 3: propagates state changes to the caller's objects and builds the output."""
    walk = inputs.walk
    if info.unchanged:
        leaves = walk.leaves
        for i, x in zip(info.changed, values):
            _set_raw(leaves[i], x)  # only Variables: raw arrays take the rebuilding path
        out_nodes = [walk.nodes[r] for r in info.out_refs]
    else:
        existing = {j: walk.nodes[i] for j, i in info.map}
        _, out_nodes = unflatten(info.graphdef, values, flat=True, existing=existing)
    leaves = list(out_other)
    for p, n in zip(info.out_pos, out_nodes):
        leaves[p] = n
    return jax.tree_util.tree_unflatten(info.out_treedef, leaves)
