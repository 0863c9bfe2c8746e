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

import functools
import inspect
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.api_util import shaped_abstractify

from refax._config import graph_mode_default, graph_updates_default
from refax._graph import _cache
from refax._graph._flatten import FlattenResult, flatten
from refax._graph._graphdef import REF, GraphDef, children, skip
from refax._graph._unflatten import unflatten
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


def root_index(graphdef: GraphDef) -> tuple[int, ...]:
    """The node index of each argument node (the entries of the root tuple)."""
    ops = graphdef.ops
    return tuple(ops[j][1] if ops[j][0] == REF else ops[j][2] for j in children(ops, 0))


def _walk_nodes(nodes: tuple) -> tuple[FlattenResult, bool]:
    """The joint walk of ``nodes`` (kept on one of them while a fresh walk would give the
    same result, see ``refax/_graph/_cache.py``) and whether every leaf is a Variable."""
    key = (_LIFT_KEY, *map(id, nodes))
    entry = _cache.lookup(nodes, key)
    if entry is not None:
        all_vars, roots = entry.extra
        kept = entry.result
        view = FlattenResult(
            kept.graphdef, None, None, entry.leaves(nodes), kept.paths, kept.num_refs
        )
        view.nodes = _LazyNodes(kept.nodes, roots, nodes)
        return view, all_vars
    epoch = EPOCH.value
    walk = flatten(nodes, with_paths=True)
    all_vars = all(isinstance(leaf, Variable) for leaf in walk.leaves)
    kept = FlattenResult(
        walk.graphdef, None, list(walk.nodes), list(walk.leaves), walk.paths, walk.num_refs
    )
    roots = root_index(walk.graphdef)
    _cache.store(nodes, key, walk, epoch, roots, kept, (all_vars, roots))
    return walk, all_vars


class _LazyNodes:
    """Index -> node for a kept walk whose argument nodes are stored as None."""

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
        raise shared_reference_error(args, kwargs)
    if all_vars:
        values = [leaf._raw_value for leaf in walk.leaves]
    else:
        values = [_raw(leaf) for leaf in walk.leaves]
    return Inputs(treedef, leaves, node_pos, walk, values, nodes)


def _show_path(path: tuple) -> str:
    out = ""
    for key in path:
        out += f".{key}" if isinstance(key, str) and out else f"[{key!r}]" if out else str(key)
    return "." + out


def shared_reference_error(args: tuple, kwargs: dict) -> ValueError:
    """The error for an object or Variable reached twice through the arguments in tree mode,
    naming every path that reaches the first such value."""
    from refax._graph._api import _children, find_duplicates

    tree: dict[str, Any] = {"args": list(args)}
    if kwargs:
        tree["kwargs"] = dict(kwargs)
    # every path to every Variable (a shared object's Variables are reached through each
    # path to it), stopping at cycles
    found: dict[int, tuple[Any, list[tuple]]] = {}
    stack: list[tuple[Any, tuple, frozenset]] = [(tree, (), frozenset())]
    while stack:
        value, path, above = stack.pop()
        if isinstance(value, Variable):
            found.setdefault(id(value), (value, []))[1].append(path)
        elif id(value) not in above and isinstance(value, (Pytree, dict, list, tuple)):
            inner = above | {id(value)}
            stack += [(c, (*path, k), inner) for k, c in reversed(_children(value))]
    groups = [(v, ps) for v, ps in found.values() if len(ps) > 1]
    if not groups:
        groups = [(None, ps) for ps in find_duplicates(tree)]
    where = ""
    if groups:
        value, paths = groups[0]
        if value is None:
            value = tree
            for key in paths[0]:
                value = value[key] if isinstance(value, (dict, list, tuple)) else vars(value)[key]
        shown = "".join(f"\n  - {_show_path(p)}" for p in paths)
        where = f"Duplicate {type(value).__name__} found at paths:\n{shown}\n\n"
    return ValueError(
        f"Shared reference found in tree mode (graph=False). {where}An object or Variable "
        "reachable through more than one path in the arguments has no single place in a "
        "pytree. Pass graph=True (graph mode keeps sharing), or remove the shared reference "
        "(nnx.clone makes an independent copy)."
    )


def check_no_input_returned(transform: str, input_leaves: list | None, out: Any) -> None:
    """Tree mode: an input Variable returned as an output would be two pytree leaves that are
    one object afterwards, which a pytree cannot express.

    Raises:
      ValueError: naming the Variable's type and its path in the output.
    """
    if not input_leaves:
        return
    ids = {id(x) for x in input_leaves if isinstance(x, Variable)}
    out_nodes = tuple(x for x in jax.tree_util.tree_leaves(out, is_leaf=is_node) if is_node(x))
    if not out_nodes or not ids:
        return
    walk = flatten(out_nodes, with_paths=True)
    for leaf, path in zip(walk.leaves, walk.paths):
        if id(leaf) in ids:
            where = ".".join(map(str, path[1:])) or "itself"
            raise ValueError(
                f"Duplicate {type(leaf).__name__}: an input Variable is returned as output "
                f"{path[0]} ({where}). nnx.{transform} without graph updates (graph=False or "
                "graph_updates=False) does not "
                "support Variable aliasing (an input Variable returned as an output, or one "
                "Variable passed twice): return its value, return a copy (nnx.clone), or pass "
                "graph=True and graph_updates=True."
            )


def check_not_captured(
    transform: str, out_nodes: Sequence[Any], inputs: list, updates: bool
) -> None:
    """An object returned by a transformed function must be an input or made inside it; one
    captured from outside (closure) was made at another trace level.

    Raises:
      ValueError: naming the captured object's type.
    """
    from refax._object import _STATE_ATTR
    from refax._tracers import current_trace

    known = {id(n) for n in inputs}
    fresh = tuple(n for n in out_nodes if id(n) not in known)
    if not fresh:
        return
    here = current_trace()
    walk = flatten(fresh)
    for node in [*walk.nodes, *walk.leaves]:
        if id(node) in known:
            continue
        if isinstance(node, Variable):
            trace = node._trace_state
        elif isinstance(node, Pytree):
            st = node.__dict__.get(_STATE_ATTR)
            trace = here if st is None else st.trace_state
        else:
            continue
        if trace != here:
            kind = type(node).__name__
            if updates:
                what = f"Cannot extract graph node from different trace level: a {kind}"
            else:
                what = f"Cannot return captured Variable state: a {kind}"
            raise ValueError(
                f"{what} returned by the function given to nnx.{transform} was neither an "
                "argument nor created inside the function (it was captured from an outer "
                "scope). Pass it as an argument (with its axis in the prefix) to return it."
            )


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
    joint_ops, in_ops = joint.graphdef.ops, graphdef.ops
    out_start = skip(joint_ops, 1)  # the outputs' tuple follows the inputs' subtree
    n_in = graphdef.num_nodes
    out_refs = tuple(
        joint_ops[j][1] if joint_ops[j][0] == REF and joint_ops[j][1] < n_in else -1
        for j in children(joint_ops, out_start)
    )
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
        and joint_ops[1:out_start] == in_ops
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


def describe_function(fun: Callable[..., Any]) -> str:
    """``name at file:line`` of a user function (unwrapping decorators and partials)."""
    while isinstance(fun, functools.partial):
        fun = fun.func
    fun = inspect.unwrap(fun)
    name = getattr(fun, "__qualname__", None) or getattr(fun, "__name__", None) or repr(fun)
    code = getattr(fun, "__code__", None)
    if code is None:
        return name
    return f"{name} at {code.co_filename}:{code.co_firstlineno}"


def check_output_types(fun: Callable[..., Any], out: Any, transform: str) -> None:
    """Raises TypeError naming the user's function and the output path when ``out`` holds a
    leaf that is neither a graph node nor a valid JAX type (JAX's own error would name refax's
    internal wrapper instead)."""
    leaves = jax.tree_util.tree_flatten_with_path(out, is_leaf=is_node)[0]
    for path, leaf in leaves:
        if is_node(leaf):
            continue
        try:
            shaped_abstractify(leaf)
        except TypeError:
            where = jax.tree_util.keystr(path) or "<the output itself>"
            raise TypeError(
                f"function {describe_function(fun)} traced for nnx.{transform} returned a "
                f"value of type {type(leaf).__name__} at output {where}, which is not a valid "
                "JAX type. Return arrays, scalars or refax objects only; keep other values out "
                "of the output (or mark an argument static)."
            ) from None


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
