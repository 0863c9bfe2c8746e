"""The lifting core shared by every transform: objects in, pure pytrees through JAX, objects out.

Every lifted transform runs the same three steps; only what happens around the user function
(axes, masks, shardings, gradients) is the transform's own:

1. **Outside** (:func:`split_inputs`): find the graph nodes (Objects, Variables) in the
   arguments and walk them jointly once (so sharing between arguments survives) into a
   GraphDef and a flat list of state leaves. The walk is cached per tuple of node identities
   and reused while a fresh walk would give the same result, so a repeated call costs a list
   comprehension over the Variables. ``Inputs.static(settings)`` is the call's :class:`Call`
   (structure, modes and the transform's own settings), wrapped as static data for JAX.
2. **Inside** the JAX transform (:class:`Step`): rebuild fresh objects from the traced
   leaves, let the transform call the user function on them, then :meth:`Step.collect` walks
   the inputs and outputs again and returns only the leaves that changed, plus static
   information about what happened (an :class:`Info`, which travels as pytree auxiliary data,
   so JAX caches it with the trace).
3. **Outside again** (:func:`apply_outputs`): if the structure did not change, write the
   changed values back into the cached Variables; otherwise rebuild the structure into the
   original objects in place (new attributes, deleted ones, new sharing) and build new output
   objects, keeping identity for nodes that were inputs.

The modes are resolved once per call (``split_inputs``) and travel in the :class:`Call`:
``graph=False`` (tree mode) refuses shared references among the arguments, and
``graph_updates=False`` propagates only the values of the Variables the inputs were rebuilt
with (no structural change), for every transform alike.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from refax._config import resolve_modes
from refax._graph import _cache
from refax._graph._flatten import NODE_TYPES, FlattenResult, flatten, is_graph_node
from refax._graph._graphdef import REF, GraphDef, children, skip
from refax._graph._unflatten import unflatten
from refax._refs import is_array_ref
from refax._tracers import EPOCH
from refax._transforms._checks import check_no_input_returned, shared_reference_error
from refax._variables import Variable, _set_raw


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


# the Static itself is the auxiliary data: unflattening (every jitted call's output) builds
# nothing, and its hash, computed once, is reused by every lookup of JAX's caches
jax.tree_util.register_pytree_node(Static, lambda s: ((), s), lambda s, _: s)


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """What the inner step needs to know about one call, as hashable static data: the
    arguments' structure, the resolved modes, and the transform's own ``settings`` (a small
    frozen dataclass per transform, e.g. jit's masks and shardings, vmap's axes)."""

    graphdef: GraphDef  # the joint walk of the argument nodes
    treedef: Any  # of (args, kwargs) with graph nodes as leaves
    node_pos: tuple[int, ...]  # positions of the nodes among those leaves
    graph: bool = True
    graph_updates: bool = True
    settings: Any = None


class Inputs:
    """The arguments of one call, split into graph state and everything else."""

    __slots__ = (
        "treedef",
        "other",
        "node_pos",
        "walk",
        "values",
        "nodes",
        "graph",
        "updates",
        "entry",
    )

    def __init__(self, treedef, other, node_pos, walk, values, nodes, graph, updates, entry):
        self.treedef = treedef  # of (args, kwargs) with graph nodes as leaves
        self.other = other  # the pytree leaves, None where a node stood
        self.node_pos = node_pos  # positions of the nodes among the leaves
        self.walk: FlattenResult = walk  # the joint walk of the nodes tuple
        self.values: list[Any] = values  # raw values of the walk's leaves
        self.nodes: tuple = nodes  # the argument objects, in order of node_pos
        self.graph: bool = graph  # the resolved modes of this call
        self.updates: bool = updates
        self.entry: Any = entry  # the walk cache's entry (``_cache.Entry``), or None

    @property
    def graphdef(self) -> GraphDef:
        return self.walk.graphdef

    def call(self, settings: Any = None) -> Call:
        """This call's :class:`Call`, with the transform's ``settings``."""
        walk = self.walk
        return Call(walk.graphdef, self.treedef, self.node_pos, self.graph, self.updates, settings)

    def static(self, settings: Any = None) -> Static:
        """:meth:`call` wrapped for JAX (the argument a pure function gets first)."""
        return Static(self.call(settings))


_LIFT_KEY = "lift"  # key prefix of lift walks in ObjectState.walks


def root_index(graphdef: GraphDef) -> tuple[int, ...]:
    """The node index of each argument node (the entries of the root tuple)."""
    ops = graphdef.ops
    return tuple(ops[j][1] if ops[j][0] == REF else ops[j][2] for j in children(ops, 0))


def _walk_nodes(nodes: tuple, hint: Any = None) -> tuple[FlattenResult, bool, Any]:
    """The joint walk of ``nodes`` (kept on one of them while a fresh walk would give the
    same result, see ``refax/_graph/_cache.py``), whether every leaf is a Variable, and the
    cache entry it came from or went to (None when it cannot be kept). ``hint``: the entry
    of an earlier call, tried first."""
    if hint is not None and _cache.still_kept(hint, nodes):
        entry = hint
    else:
        key = (_LIFT_KEY, *map(id, nodes))
        entry = _cache.lookup(nodes, key)
    if entry is not None:
        all_vars, roots = entry.extra
        kept = entry.result
        view = FlattenResult(
            kept.graphdef, None, None, entry.leaves(nodes), kept.paths, kept.num_refs
        )
        view.nodes = _LazyNodes(kept.nodes, roots, nodes)
        return view, all_vars, entry
    epoch = EPOCH.value
    walk = flatten(nodes, with_paths=True)
    all_vars = all(isinstance(leaf, Variable) for leaf in walk.leaves)
    kept = FlattenResult(
        walk.graphdef, None, list(walk.nodes), list(walk.leaves), walk.paths, walk.num_refs
    )
    roots = root_index(walk.graphdef)
    # (``key`` is set: a hint that passed returned above)
    entry = _cache.store(nodes, key, walk, epoch, roots, kept, (all_vars, roots))
    return walk, all_vars, entry


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


_raw_value = operator.attrgetter("_raw_value")
_consume = collections.deque(maxlen=0).extend  # runs an iterator to its end


def raw(leaf: Any) -> Any:
    """A state leaf's value: a Variable's raw value, anything else as it is."""
    return leaf._raw_value if isinstance(leaf, Variable) else leaf


def input_leaves(nodes: tuple) -> list[Any]:
    """The state leaves (Variables, raw arrays) of ``nodes``, in walk order."""
    return flatten(nodes).leaves


def split_inputs(
    args: tuple, kwargs: dict, *, graph: bool | None = None, graph_updates: bool | None = None
) -> Inputs:
    """Step 1: separates graph nodes from the rest of the arguments and walks them.

    ``graph`` / ``graph_updates`` (``None`` reads the ``set_graph_mode`` /
    ``set_graph_updates`` defaults) are resolved here and kept on the result.

    Raises:
      ValueError: in tree mode (``graph=False``), for an object reachable twice.
    """
    graph, updates = resolve_modes(graph, graph_updates)
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs), is_leaf=is_graph_node)
    node_pos = tuple(i for i, x in enumerate(leaves) if is_graph_node(x))
    nodes = tuple(leaves[i] for i in node_pos)
    for i in node_pos:
        leaves[i] = None
    return _split_nodes(args, kwargs, treedef, leaves, node_pos, nodes, graph, updates)


def _split_nodes(
    args, kwargs, treedef, other, node_pos, nodes, graph, updates, hint=None
) -> Inputs:
    walk, all_vars, entry = _walk_nodes(nodes, hint)
    if not graph and walk.num_refs:
        raise shared_reference_error(args, kwargs)
    if all_vars:
        values = list(map(_raw_value, walk.leaves))
    else:
        values = list(map(raw, walk.leaves))
    return Inputs(treedef, other, node_pos, walk, values, nodes, graph, updates, entry)


# Types whose values are always exactly one pytree leaf (never a container or a graph node):
# Python scalars, NumPy arrays, and the jax.Array and NumPy scalar types met so far.
_PLAIN_LEAVES = {int, float, bool, complex, np.ndarray}


def _plain_leaf(x: Any) -> bool:
    if type(x) in _PLAIN_LEAVES:
        return True
    if isinstance(x, (jax.Array, np.generic)):
        _PLAIN_LEAVES.add(type(x))
        return True
    return False


def _getter(pos: tuple[int, ...]) -> Callable[[tuple], tuple]:
    """``args -> tuple(args[i] for i in pos)``, as one C call."""
    start = pos[0] if pos else 0
    if pos == tuple(range(start, start + len(pos))):
        return operator.itemgetter(slice(start, start + len(pos)))
    return operator.itemgetter(*pos)  # (two or more positions: it returns a tuple)


_NODE_TYPES_EACH = itertools.repeat(NODE_TYPES)


@dataclasses.dataclass(frozen=True, slots=True)
class ArgPattern:
    """Positional arguments that are each a graph node or one plain array or scalar (the
    usual ``step(model, optimizer, x, y)``): :meth:`split` does what :func:`split_inputs`
    does without flattening them, for a wrapper called again and again the same way."""

    n: int  # number of positional arguments
    node_pos: tuple[int, ...]  # where the graph nodes are
    other_pos: tuple[int, ...]  # where the plain leaves are
    treedef: Any  # of ``(args, {})``: n leaves
    modes: tuple[bool, bool]  # (graph, graph_updates) resolved
    nodes_of: Callable[[tuple], tuple]  # args -> the nodes
    others_of: Callable[[tuple], tuple]  # args -> the plain leaves

    @classmethod
    def of(cls, inputs: Inputs, args: tuple, kwargs: dict) -> ArgPattern | None:
        """The pattern of a call just split by :func:`split_inputs`, or None when its
        arguments are not all nodes and plain leaves."""
        n = len(args)
        if kwargs or len(inputs.other) != n:
            return None
        other_pos = tuple(i for i in range(n) if i not in inputs.node_pos)
        if not all(_plain_leaf(args[i]) for i in other_pos):
            return None
        if inputs.treedef != jax.tree_util.tree_structure(((0,) * n, {})):
            return None
        modes = (inputs.graph, inputs.updates)
        node_pos = inputs.node_pos
        return cls(
            n, node_pos, other_pos, inputs.treedef, modes, _getter(node_pos), _getter(other_pos)
        )

    def split(
        self, args: tuple, graph: bool | None, graph_updates: bool | None, hint: Any = None
    ) -> Inputs | None:
        """``split_inputs(args, {}, ...)`` when ``args`` have this pattern, else None;
        ``hint``: the walk cache entry of an earlier call (see :func:`_walk_nodes`)."""
        if len(args) != self.n:
            return None
        nodes = self.nodes_of(args)
        if not all(map(isinstance, nodes, _NODE_TYPES_EACH)):  # is_graph_node, inlined
            return None
        if not all(map(_PLAIN_LEAVES.__contains__, map(type, self.others_of(args)))):
            return None
        modes = resolve_modes(graph, graph_updates)
        if modes != self.modes:
            return None
        other = list(args)
        for i in self.node_pos:
            other[i] = None
        return _split_nodes(args, {}, self.treedef, other, self.node_pos, nodes, *modes, hint)


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
        "ref_outs",
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
        # output leaves that were jax.Refs (which cannot leave a JAX transform): (position,
        # index among the other argument leaves of the input Ref it is, or -1 for a new one)
        self.ref_outs: tuple[tuple[int, int], ...] = ()

    @classmethod
    def same_structure(cls, changed: tuple, out_treedef, out_pos: tuple, out_refs: tuple) -> Info:
        """The structure of the inputs did not change; the ``changed`` leaves come back."""
        return cls(True, changed, out_treedef, out_pos, out_refs, None, ())

    def with_changed(self, changed: tuple) -> Info:
        """This (unchanged-structure) info with other leaves coming back."""
        info = Info.same_structure(changed, self.out_treedef, self.out_pos, self.out_refs)
        info.ref_outs = self.ref_outs
        return info

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
            self.ref_outs,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Info) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


class Step:
    """Step 2, the inner step of every transform, run while JAX traces.

    ``Step(call, values, other)`` rebuilds fresh objects from the traced ``values`` and the
    other argument leaves (``args``, ``kwargs``, ``nodes``: the argument objects, ``built``:
    every node built, by index); the transform calls the user function on them and hands the
    part of its output that may hold objects to :meth:`collect`.
    """

    __slots__ = ("call", "values", "other", "args", "kwargs", "nodes", "built", "input_leaves")

    def __init__(self, call: Call, values: Sequence[Any], other: Sequence[Any]):
        self.call = call
        self.values = values
        self.other = other
        built: list[Any] = []
        nodes = unflatten(call.graphdef, values, flat=True, nodes_out=built)
        leaves = list(other)
        for p, n in zip(call.node_pos, nodes):
            leaves[p] = n
        self.args, self.kwargs = jax.tree_util.tree_unflatten(call.treedef, leaves)
        self.nodes: tuple = nodes
        self.built: list[Any] = built
        # without graph updates only the values of the leaves the inputs were rebuilt with
        # propagate (looked up by identity afterwards); structural changes stay inside
        self.input_leaves: list[Any] | None = None if call.graph_updates else input_leaves(nodes)

    @property
    def settings(self) -> Any:
        return self.call.settings

    def run(self, fun: Callable[..., Any]) -> Any:
        """``fun(*args, **kwargs)`` on the rebuilt arguments."""
        return fun(*self.args, **self.kwargs)

    def check_tree_mode_output(self, transform: str, out: Any) -> None:
        """In tree mode an input Variable returned as an output is an error (two pytree
        leaves that would be one object afterwards)."""
        if not self.call.graph:
            check_no_input_returned(transform, self.input_leaves, out)

    def _same_inputs(self, joint: FlattenResult) -> bool:
        """Whether the inputs kept their structure and node identities in ``joint``."""
        graphdef = self.call.graphdef
        ops = joint.graphdef.ops
        return ops[1 : skip(ops, 1)] == graphdef.ops and all(
            map(operator.is_, joint.nodes[: graphdef.num_nodes], self.built)
        )

    def collect(
        self,
        out: Any,
        *,
        every_input: bool | tuple[bool, ...] = False,
        before_walk: Callable[[FlattenResult], None] | None = None,
        annotate: Callable[[FlattenResult], Any] | None = None,
    ) -> tuple[Info, list[Any], list[Any]]:
        """After the user function: what changed, as ``(info, values, out_other)``.

        ``values`` holds the changed input leaves (structure unchanged) or every leaf of the
        joint (inputs, outputs) walk (structure changed; ``info.paths`` then gives their
        paths). ``every_input`` returns every input leaf, changed or not (vectorising
        transforms must return each batched value), or those a mask selects (donated buffers).
        ``before_walk(joint)`` may edit Variable metadata (axis names) before the final walk;
        ``annotate(joint)`` attaches per-leaf data (axes) to a changed structure's info.
        ``jax.Ref`` output leaves, which cannot leave a JAX transform, are replaced (see
        ``Info.ref_outs``) and restored by :func:`apply_outputs`.
        """
        info, values, out_leaves = self._collect(out, every_input, before_walk, annotate)
        if any(map(is_array_ref, out_leaves)):
            info.ref_outs = self._refs_out(out_leaves)
        return info, values, out_leaves

    def _refs_out(self, out_leaves: list[Any]) -> tuple[tuple[int, int], ...]:
        """Replaces the jax.Refs among the output leaves (they cannot leave a JAX transform):
        an input Ref by None (the caller's Ref comes back), a new one by its value (a new
        Ref is made outside)."""
        inputs = {id(x): k for k, x in enumerate(self.other) if is_array_ref(x)}
        found = []
        for i, x in enumerate(out_leaves):
            if is_array_ref(x):
                k = inputs.get(id(x), -1)
                out_leaves[i] = None if k >= 0 else x[...]
                found.append((i, k))
        return tuple(found)

    def _collect(
        self,
        out: Any,
        every_input: bool | tuple[bool, ...],
        before_walk: Callable[[FlattenResult], None] | None,
        annotate: Callable[[FlattenResult], Any] | None,
    ) -> tuple[Info, list[Any], list[Any]]:
        graphdef, built = self.call.graphdef, self.built
        out_leaves, out_treedef = jax.tree_util.tree_flatten(out, is_leaf=is_graph_node)
        out_pos = tuple(i for i, x in enumerate(out_leaves) if is_graph_node(x))
        out_nodes = tuple(out_leaves[i] for i in out_pos)
        for i in out_pos:
            out_leaves[i] = None
        if before_walk is not None:
            before_walk(flatten((self.nodes, out_nodes), with_paths=True))
        joint = None
        if self.input_leaves is not None:  # no graph updates: values only
            position = {id(n): i for i, n in enumerate(built)}
            refs = tuple(position.get(id(n), -1) for n in out_nodes)
            if -1 not in refs:
                leaves = self.input_leaves
                if not all(isinstance(x, Variable) for x in leaves):
                    # a raw-array attribute rebound inside shows only in a walk; it is a
                    # value, written back below while the inputs' structure is the same
                    joint = flatten((self.nodes, out_nodes), with_paths=True)
                    if self._same_inputs(joint):
                        leaves = None
                if leaves is not None:  # by identity: Variables' values, no structure
                    new = [raw(leaf) for leaf in leaves]
                    changed = _changed(new, self.values, every_input)
                    changed = tuple(i for i in changed if isinstance(leaves[i], Variable))
                    info = Info.same_structure(changed, out_treedef, out_pos, refs)
                    return info, [new[i] for i in changed], out_leaves
        if joint is None:
            joint = flatten((self.nodes, out_nodes), with_paths=True)
        joint_ops, in_ops = joint.graphdef.ops, graphdef.ops
        out_start = skip(joint_ops, 1)  # the outputs' tuple follows the inputs' subtree
        n_in = graphdef.num_nodes
        out_refs = tuple(
            joint_ops[j][1] if joint_ops[j][0] == REF and joint_ops[j][1] < n_in else -1
            for j in children(joint_ops, out_start)
        )
        # Unchanged means: same encoding, the very same objects at every node index (a swap
        # of two Variables keeps the encoding but not the identities), no new output objects,
        # and no raw-array attribute rebound (those are written back by rebuilding, below).
        unchanged = (
            joint_ops[1:out_start] == in_ops
            and -1 not in out_refs
            and all(map(operator.is_, joint.nodes[:n_in], built))
        )
        if unchanged:
            in_leaves = joint.leaves[: graphdef.num_leaves]
            new = [raw(leaf) for leaf in in_leaves]
            changed = _changed(new, self.values, every_input)
            if all(isinstance(in_leaves[i], Variable) for i in changed):
                info = Info.same_structure(changed, out_treedef, out_pos, out_refs)
                return info, [new[i] for i in changed], out_leaves
        position = {id(n): i for i, n in enumerate(built)}
        node_map = tuple(
            (j, position[id(n)]) for j, n in enumerate(joint.nodes) if id(n) in position
        )
        values = [raw(leaf) for leaf in joint.leaves]
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
    """The pure function of a transform that only runs the user function (remat, checkify):
    ``pure(Static(call), values, other) -> (Static(info), new_values, out_other)``, where the
    user function is called as ``fun(step)`` and returns its output."""

    def pure(
        static: Static, values: list[Any], other: list[Any]
    ) -> tuple[Static, list[Any], list[Any]]:
        step = Step(static.value, values, other)
        info, new_values, out_other = step.collect(fun(step))
        return Static(info), new_values, out_other

    return pure


def apply_outputs(inputs: Inputs, info: Info, values: Sequence[Any], out_other: list[Any]) -> Any:
    """Step 3: propagates state changes to the caller's objects and builds the output."""
    walk = inputs.walk
    if info.unchanged:
        # only Variables: raw arrays take the rebuilding path
        _consume(map(_set_raw, map(walk.leaves.__getitem__, info.changed), values))
        if not info.out_pos and not info.ref_outs:
            return info.out_treedef.unflatten(out_other)
        out_nodes = [walk.nodes[r] for r in info.out_refs]
    else:
        existing = {j: walk.nodes[i] for j, i in info.map}
        _, out_nodes = unflatten(info.graphdef, values, flat=True, existing=existing)
    leaves = list(out_other)
    for p, n in zip(info.out_pos, out_nodes):
        leaves[p] = n
    for i, k in info.ref_outs:
        leaves[i] = inputs.other[k] if k >= 0 else jax.new_ref(leaves[i])
    return jax.tree_util.tree_unflatten(info.out_treedef, leaves)
