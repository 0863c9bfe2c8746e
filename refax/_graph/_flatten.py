"""Object graph -> (GraphDef, state): one iterative depth-first walk.

``flatten`` visits a value once, depth first, remembering every graph node (Object or Variable)
by identity: the first visit records the node, later visits record a reference to its index
(this preserves sharing and allows cycles). State leaves (Variables and raw arrays) are placed
into nested dicts by path, one dict per filter. The walk keeps its own stack, so a graph of any
depth goes through at Python's default recursion limit, and it creates no closures, so it leaves
no reference cycle behind (a dropped model is freed by reference counting at once).

An Object's attributes are classified by a *layout*: which names are static (they go into the
GraphDef, sorted) and which are walked (sorted), looked up by the exact tuple of attribute
names and value types, so a model of many equal layers classifies each kind of layer once.
Nothing about an object is trusted from an earlier walk: every walk reads every attribute.

Every walk also records what it read (``FlattenResult.witness``): the objects, their attribute
values, the containers and pytrees it went through. ``_cache.py`` keeps walks and checks a kept
walk against its witness before reusing it; see README.md for the invariant.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax

from refax._graph._graphdef import ARR, DICT, LIST, OBJ, REF, STATIC, TREE, TUPLE, VAR, GraphDef
from refax._graph._refmap import RefMap
from refax._kinds import (
    K_ARRAY,
    K_DICT,
    K_LIST,
    K_OBJ,
    K_OTHER,
    K_STATIC,
    K_TUPLE,
    K_VAR,
    KIND,
    all_static,
    kind_of,
)
from refax._object import _STATE_ATTR, Pytree
from refax._statelib import State
from refax._variables import Variable
from refax.errors import FilterError, UnhashableStaticError

_ARR_ENTRY = (ARR,)
_is = operator.is_


NODE_TYPES = (Pytree, Variable)  # the graph nodes: Objects (Modules, Rngs, ...) and Variables


def is_graph_node(value: Any) -> bool:
    """True for Objects (Modules, Rngs, ...) and Variables."""
    return isinstance(value, NODE_TYPES)


def path_str(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path) or "<root>"


def tree_children(value: Any) -> tuple[Any, tuple, tuple]:
    """One level of a registered pytree: (treedef, keys, children)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(value, is_leaf=lambda x: x is not value)
    keys = []
    for kp, _ in flat:
        entry = kp[0]
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                keys.append(getattr(entry, attr))
                break
        else:
            keys.append(str(entry))
    return treedef, tuple(keys), tuple(c for _, c in flat)


def sorted_keys(keys: Any) -> tuple:
    """Keys in canonical (sorted) order; mixed key types sort by type name first."""
    try:
        return tuple(sorted(keys))
    except TypeError:
        try:
            return tuple(sorted(keys, key=lambda k: (type(k).__name__, k)))
        except TypeError:
            return tuple(keys)


# -- object layouts ----------------------------------------------------------------------------
_K_FORCED = -1  # a value marked ``nnx.data`` that would otherwise be static: an array leaf


def _getter(positions: tuple[int, ...]) -> Callable[[tuple], tuple]:
    """``vals -> tuple(vals[p] for p in positions)``, in C for two positions or more."""
    if not positions:
        return lambda vals: ()
    if len(positions) == 1:
        p = positions[0]
        return lambda vals: (vals[p],)
    return operator.itemgetter(*positions)


class _Layout:
    """How to read one shape of Object (one tuple of keys and value types).

    Attributes:
      snames, statics: the static attributes' sorted names, and a getter of their values from
        the tuple of ``__dict__`` values.
      lnames, leaves, lkinds: the attributes that are state leaves (Variables, arrays, values
        marked ``nnx.data``), sorted, a getter of their values, and their kinds.
      wnames, walked: the attributes the walk goes into (Objects, containers, pytrees), sorted,
        and a getter of their values.
      dnames: ``lnames + wnames``, the order of the Object's child entries in a GraphDef.
      check: positions whose values must be hash-checked on every walk (their type does not
        guarantee hashability).
      tuples: positions holding tuples, static or not depending on their contents.
      n: the number of attributes (with refax's entry); marks: the object's marks, or None.
    """

    __slots__ = ("snames", "statics", "lnames", "leaves", "lkinds", "wnames", "walked")
    __slots__ += ("dnames", "check", "tuples", "variants", "n", "marks", "fields")

    def __init__(self, keys: tuple, vals: tuple, marks: tuple, tuple_flags: dict[int, bool]):
        static_names, data_names = marks
        self.n = len(keys)
        self.marks = marks if static_names or data_names else None
        statics: dict[Any, int] = {}
        leaves: dict[Any, tuple[int, int]] = {}
        walked: dict[Any, int] = {}
        check, tuples = [], []
        for p, name in enumerate(keys):
            if name == _STATE_ATTR:
                continue
            v = vals[p]
            k = KIND.get(type(v))
            if k is None:
                k = kind_of(v)
            if k == K_TUPLE:
                tuples.append(p)
                if tuple_flags.get(p, False):
                    k = K_STATIC
            if name in static_names:
                statics[name] = p
                if k != K_STATIC:
                    check.append(p)
            elif name in data_names and k in (K_STATIC, K_OTHER) and v is not None:
                leaves[name] = (p, _K_FORCED)
            elif k == K_STATIC:
                statics[name] = p
            elif k == K_OTHER:
                statics[name] = p
                check.append(p)
            elif k == K_VAR or k == K_ARRAY:
                leaves[name] = (p, k)
            else:
                walked[name] = p
        self.snames = sorted_keys(statics)
        self.statics = _getter(tuple(statics[n] for n in self.snames))
        self.lnames = sorted_keys(leaves)
        self.leaves = _getter(tuple(leaves[n][0] for n in self.lnames))
        self.lkinds = tuple(leaves[n][1] for n in self.lnames)
        self.wnames = sorted_keys(walked)
        self.walked = _getter(tuple(walked[n] for n in self.wnames))
        self.dnames = self.lnames + self.wnames
        self.check = tuple(check)
        self.tuples = tuple(tuples)
        self.variants: dict[tuple, _Layout] = {}
        # what a walk reads, in one tuple (unpacked at once: cheaper than attribute reads)
        self.fields = (
            self.statics,
            self.snames,
            self.dnames,
            self.marks,
            self.lnames,
            self.leaves,
            self.lkinds,
            self.wnames,
            self.walked,
        )


_LAYOUTS: dict[tuple, _Layout] = {}
_NO_MARK = frozenset()


def _layout(keys: tuple, vals: tuple, st: Any) -> _Layout:
    """The layout of an object with these attribute names and values (cached per shape)."""
    if st is None or (st.static_names is _NO_MARK and st.data_names is _NO_MARK):
        marks = None
        key = (keys, tuple(map(type, vals)))
    else:
        marks = (st.static_names, st.data_names)
        key = (keys, tuple(map(type, vals)), marks)
    base = _LAYOUTS.get(key)
    if base is None:
        if len(_LAYOUTS) > 4096:
            _LAYOUTS.clear()
        base = _LAYOUTS[key] = _Layout(keys, vals, marks or (_NO_MARK, _NO_MARK), {})
    if not base.tuples:
        return base
    flags = tuple(all_static(vals[p]) for p in base.tuples)
    lay = base.variants.get(flags)
    if lay is None:
        lay = _Layout(keys, vals, marks or (_NO_MARK, _NO_MARK), dict(zip(base.tuples, flags)))
        base.variants[flags] = lay
    return lay


def _check_hashable(vals: tuple, positions: tuple, keys: tuple, path: tuple) -> None:
    for p in positions:
        try:
            hash(vals[p])
        except TypeError:
            raise UnhashableStaticError(
                f"Static attribute '{path_str((*path, keys[p]))}' holds an unhashable "
                f"{type(vals[p]).__name__}: static values go into the GraphDef and must be "
                "hashable. Use a hashable type (e.g. a tuple), or store arrays in a Variable "
                "or wrap the value with nnx.data(...)."
            ) from None


def _hashable_static(v: Any, path: tuple) -> Any:
    try:
        hash(v)
    except TypeError:
        raise UnhashableStaticError(
            f"Static attribute '{path_str(path)}' holds an unhashable {type(v).__name__}: "
            "static values go into the GraphDef and must be hashable. Use a hashable type "
            "(e.g. a tuple), or store arrays in a Variable or wrap the value with nnx.data(...)."
        ) from None
    return v


# -- the walk ----------------------------------------------------------------------------------
class Witness:
    """What one walk read, to tell later whether a walk would still produce the same result.

    Attributes:
      objs: the Objects walked, in walk order.
      vals: for each Object, the tuple of its ``__dict__`` values as read.
      lists: ``(list, items)`` for every list walked.
      dicts: ``(dict, keys, values)`` for every dict walked (a State's included).
      trees: ``(pytree, treedef, children)`` for every mutable registered pytree walked.
      keyed: ``(position in objs, keys)`` for the objects whose bookkeeping entry is not last
        in their ``__dict__`` (their keys are not implied by their values' order).
      cacheable: False when an object lacks refax's bookkeeping entry (it cannot be checked).
    """

    __slots__ = ("nodes", "vals", "lists", "dicts", "trees", "keyed", "cacheable")

    def __init__(self, nodes: list[Any]):
        self.nodes = nodes  # the walk's nodes: its Objects, in order, are ``objs``
        self.vals: list[tuple] = []
        self.keyed: list[tuple[int, tuple]] = []
        self.lists: list[tuple[list, tuple]] = []
        self.dicts: list[tuple[dict, tuple, tuple]] = []
        self.trees: list[tuple[Any, Any, tuple]] = []
        self.cacheable = True

    @property
    def objs(self) -> list[Any]:
        return [n for n in self.nodes if isinstance(n, Pytree)]


class FlattenResult:
    """Everything one walk produced.

    Attributes:
      graphdef: the structure.
      states: one nested dict of leaves per filter.
      nodes: the graph nodes by index.
      leaves: the state leaves (Variables and raw arrays) in walk order.
      paths: the path of each leaf (when asked for, else None).
      num_refs: how many references to already visited nodes the walk met (0: a tree).
      ref_targets: the node indices those references point to.
      witness: what the walk read (see ``Witness``).
    """

    __slots__ = ("graphdef", "states", "nodes", "leaves", "paths", "num_refs", "ref_targets")
    __slots__ += ("witness",)

    def __init__(self, graphdef, states, nodes, leaves, paths=None, num_refs=0):
        self.graphdef: GraphDef = graphdef
        self.states: list[dict] = states
        self.nodes: Any = nodes
        self.leaves: list[Any] = leaves
        self.paths: list[tuple] | None = paths
        self.num_refs: int = num_refs
        self.ref_targets: frozenset[int] = frozenset()
        self.witness: Witness | None = None


def flatten(
    root: Any,
    predicates: Sequence[Callable[[tuple, Any], bool]] | None = None,
    *,
    filters_repr: Sequence[Any] = (),
    with_paths: bool = False,
    ref_index: RefMap | None = None,
) -> FlattenResult:
    """Walks ``root`` once and returns its GraphDef, nested state dicts and bookkeeping.

    Args:
      root: any value: an Object, a Variable, or a pytree containing them. A bare Variable or
        array is a leaf at the empty path (its state dict holds it under the key ``None``).
      predicates: one predicate per output state; each leaf goes to the first that matches.
        ``None`` puts every leaf into a single state.
      filters_repr: the filters behind ``predicates``, for the error message.
      with_paths: also list the path of every leaf (``FlattenResult.paths``).
      ref_index: node numbering shared with earlier walks (``split_context``): nodes it
        holds become references, new nodes are numbered after them and added to it.
    """
    walker = _Walker(predicates, with_paths)
    if ref_index is not None:
        walker.seen = ref_index._index
        walker.nodes.extend([None] * len(ref_index))  # (global numbering: see RefMap)
        walker.witness.cacheable = False
        try:
            walker.run(root)
        except BaseException:
            for node in walker.nodes[len(ref_index._objects) :]:
                ref_index._index.pop(id(node), None)
            raise
        objects = ref_index._objects
        for node in walker.nodes[len(objects) :]:
            objects[id(node)] = node
    else:
        walker.run(root)
    if walker.unmatched:
        unmatched = walker.unmatched
        shown = ", ".join(repr(path_str(p)) for p in unmatched[:5])
        more = f" (and {len(unmatched) - 5} more)" if len(unmatched) > 5 else ""
        raise FilterError(
            f"Non-exhaustive filters, got a non-empty remainder: {shown}{more} matched none of "
            f"the filters ({', '.join(_filter_name(f) for f in filters_repr)}). Add `...` as "
            "the last filter to collect the rest."
        )
    result = FlattenResult(
        GraphDef(tuple(walker.ops), len(walker.leaves), len(walker.nodes)),
        walker.states,
        walker.nodes,
        walker.leaves,
        walker.paths,
        walker.num_refs,
    )
    result.ref_targets = frozenset(walker.ref_targets)
    result.witness = walker.witness
    return result


class _Walker:
    """The state of one walk (a class, not closures: nothing of it outlives the walk).

    An Object's state leaves (Variables, arrays) are handled inside ``open``, in one loop; the
    main loop in ``run`` goes into sub-Objects and containers with an explicit stack.
    """

    def __init__(self, predicates: Sequence[Callable] | None, with_paths: bool):
        self.predicates = predicates
        self.single = predicates is None
        self.n_states = 1 if predicates is None else len(predicates)
        self.need_paths = with_paths or predicates is not None
        self.paths: list[tuple] | None = [] if with_paths else None
        self.seen: dict[int, int] = {}
        self.nodes: list[Any] = []
        self.leaves: list[Any] = []
        self.ops: list[tuple] = []
        self.unmatched: list[tuple] = []
        self.ref_targets: set[int] = set()
        self.num_refs = 0
        self.witness = Witness(self.nodes)
        self.states: list[dict] = [{} for _ in range(self.n_states)]
        self.stack: list[tuple] = []

    def path_to(self, key: Any) -> tuple:
        """The path of the child ``key`` of the node on top of the stack (for error messages,
        when the walk does not track paths)."""
        return (*(frame[4] for frame in self.stack[1:]), key)

    def leaf(self, v: Any, k: int, key: Any, path: tuple | None, outs: list[dict]) -> None:
        """Records a state leaf (a Variable, array or value marked data) found at ``key`` of
        the node at ``path`` (``key`` None and ``path`` None: the root itself is the leaf)."""
        if k == K_VAR:
            idx = self.seen.get(id(v))
            if idx is not None:
                self.num_refs += 1
                self.ref_targets.add(idx)
                self.ops.append((REF, idx))
                return
            self.seen[id(v)] = idx = len(self.nodes)
            self.nodes.append(v)
            frozen = v._frozen
            if frozen is None:
                frozen = v._frozen_metadata()
            self.ops.append((VAR, type(v), idx, frozen))
        else:
            self.ops.append(_ARR_ENTRY)
        self.leaves.append(v)
        if self.need_paths:
            path = () if path is None else path + (key,)
            if self.paths is not None:
                self.paths.append(path)
            if not self.single:
                self.place(outs, key, path, v)
                return
        outs[0][key] = v

    def place(self, outs: list[dict], key: Any, path: tuple, leaf: Any) -> None:
        for i, pred in enumerate(self.predicates):  # type: ignore[arg-type]
            if pred(path, leaf):
                outs[i][key] = leaf
                return
        self.unmatched.append(path)

    def layout_of(self, obj: Any, d: dict, st: Any, path: tuple | None, key: Any) -> tuple:
        """Classifies an Object's attributes afresh: ``(layout, values)``; keeps the layout on
        the object, with the values it was made from, for the next walk."""
        keys = tuple(d)
        if st is None:
            self.witness.cacheable = False
        elif keys[-1] != _STATE_ATTR:
            if st.tracked:  # a kept walk may depend on this order: record the keys
                self.witness.keyed.append((len(self.witness.vals), keys))
            else:
                # Put refax's entry last (no kept walk has seen this object yet): a key added
                # later lands after it, so renaming a key (pop + insert) changes the order of
                # the values a kept walk compares.
                d[_STATE_ATTR] = d.pop(_STATE_ATTR)
                keys = tuple(d)
        vals = tuple(d.values())
        lay = _layout(keys, vals, st)
        if lay.check:
            _check_hashable(vals, lay.check, keys, self.path_to(key) if path is None else path)
        if st is not None:
            st.tracked = True
            if keys[-1] == _STATE_ATTR:
                # (not the entry itself: it would hold itself, a reference cycle)
                st.layout, st.snap = lay, vals[:-1]
        return lay, vals

    def open(self, value: Any, k: int, path: tuple | None, outs: list[dict], key: Any) -> Any:
        """Records the entry of a node or container (and an Object's state leaves); returns an
        iterator over the children still to walk, or None.

        ``path`` is the node's path, or None when the walk does not track paths (the node is
        then the child ``key`` of the node on top of the stack).
        """
        ops = self.ops
        witness = self.witness
        if k == K_OBJ:
            nodes = self.nodes
            self.seen[id(value)] = idx = len(nodes)
            nodes.append(value)
            d = value.__dict__
            st = d.get(_STATE_ATTR)
            vals = tuple(d.values())
            lay = None if st is None else st.layout
            # The layout of the object's last walk still holds when refax's entry is still last
            # (so no key was added or renamed: a new key lands after it), no key was removed,
            # and every other value is the one it was made from (so the kinds are the same).
            # Any write through __setattr__ drops the layout; this check sees the others.
            if (
                lay is None
                or vals[-1] is not st
                or len(vals) != lay.n
                or not all(map(_is, vals, st.snap))
            ):
                lay, vals = self.layout_of(value, d, st, path, key)
            witness.vals.append(vals)
            statics, snames, dnames, marks, lnames, leaves, lkinds, wnames, walked = lay.fields
            ops.append((OBJ, type(value), idx, snames, statics(vals), dnames, marks))
            if lnames:
                if self.need_paths:
                    for name, v, kv in zip(lnames, leaves(vals), lkinds):
                        self.leaf(v, kv, name, path, outs)
                else:  # the common case, inline (as in ``leaf``)
                    seen, all_leaves, out0 = self.seen, self.leaves, outs[0]
                    for name, v, kv in zip(lnames, leaves(vals), lkinds):
                        if kv == K_VAR:
                            vidx = seen.setdefault(id(v), len(nodes))
                            if vidx != len(nodes):
                                self.num_refs += 1
                                self.ref_targets.add(vidx)
                                ops.append((REF, vidx))
                                continue
                            frozen = v._frozen
                            if frozen is None:
                                frozen = v._frozen_metadata()
                            nodes.append(v)
                            ops.append((VAR, type(v), vidx, frozen))
                        else:
                            ops.append(_ARR_ENTRY)
                        all_leaves.append(v)
                        out0[name] = v
            if wnames:
                return zip(wnames, walked(vals))
            return None
        if k == K_LIST:
            snap = tuple(value)
            witness.lists.append((value, snap))
            ops.append((LIST, len(snap)))
            return enumerate(snap)
        if k == K_TUPLE:
            ops.append((TUPLE, len(value)))
            return enumerate(value)
        if k == K_DICT:
            keys = tuple(value)
            vals = tuple(value.values())
            witness.dicts.append((value, keys, vals))
            ops.append((DICT, keys))
            return zip(keys, vals)
        treedef, keys, children = tree_children(value)
        if isinstance(value, State):  # its items live in one plain dict
            m = value._mapping
            witness.dicts.append((m, tuple(m), tuple(m.values())))
        elif not isinstance(value, tuple):  # mutable pytrees (OrderedDict, dataclasses, ...)
            witness.trees.append((value, treedef, children))
        ops.append((TREE, treedef, keys))
        return zip(keys, children)

    def run(self, root: Any) -> None:
        k_root = kind_of(root)
        if (k_root == K_OBJ or k_root == K_VAR) and id(root) in self.seen:
            idx = self.seen[id(root)]  # met by an earlier walk sharing the numbering
            self.num_refs += 1
            self.ref_targets.add(idx)
            self.ops.append((REF, idx))
            return
        if k_root in (K_VAR, K_ARRAY, K_STATIC, K_OTHER):
            # a bare leaf (any other value too: split(42) hands 42 back as its state); state
            # dicts hold it under None. (A root tuple is walked even when all static.)
            self.leaf(root, K_VAR if k_root == K_VAR else K_ARRAY, None, None, self.states)
            return
        single, need_paths, n_states = self.single, self.need_paths, self.n_states
        seen, ops, ref_targets, leaf, open_ = (
            self.seen,
            self.ops,
            self.ref_targets,
            self.leaf,
            self.open,
        )
        kind_get = KIND.get
        # frames: (children iterator, path, output dicts, parent's output dicts, key in parent)
        stack = self.stack
        root_it = open_(root, k_root, (), self.states, None)
        if root_it is None:
            return
        stack.append((root_it, (), self.states, None, None))
        while stack:
            it, path, outs, parent_outs, parent_key = stack[-1]
            for key, v in it:
                k = kind_get(type(v))
                if k is None:
                    k = kind_of(v)
                if k == K_OBJ:
                    idx = seen.get(id(v))
                    if idx is not None:
                        self.num_refs += 1
                        ref_targets.add(idx)
                        ops.append((REF, idx))
                        continue
                elif k == K_STATIC:
                    ops.append((STATIC, v))
                    continue
                elif k == K_VAR or k == K_ARRAY:
                    leaf(v, k, key, path, outs)
                    continue
                elif k == K_OTHER:
                    try:
                        hash(v)
                    except TypeError:
                        _hashable_static(v, self.path_to(key))
                    ops.append((STATIC, v))
                    continue
                child_path = path + (key,) if need_paths else None
                if single:
                    child_outs = [{}]
                    child_it = open_(v, k, child_path, child_outs, key)
                    if child_it is None:
                        if child_outs[0]:
                            outs[0][key] = child_outs[0]
                        continue
                else:
                    child_outs = [{} for _ in range(n_states)]
                    child_it = open_(v, k, child_path, child_outs, key)
                    if child_it is None:
                        _attach(outs, key, child_outs)
                        continue
                stack.append((child_it, child_path, child_outs, outs, key))
                break
            else:
                stack.pop()
                if parent_outs is not None:
                    _attach(parent_outs, parent_key, outs)


def _attach(parent_outs: list[dict], key: Any, outs: list[dict]) -> None:
    """Puts a node's non-empty output dicts into its parent's, under ``key``."""
    for parent, out in zip(parent_outs, outs):
        if out:
            parent[key] = out


def _filter_name(f: Any) -> str:
    return f.__name__ if isinstance(f, type) else repr(f)
