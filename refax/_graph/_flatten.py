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
from refax._object import Pytree
from refax._statelib import State
from refax._variables import Variable
from refax.errors import FilterError, GraphStructureError, UnhashableStaticError

_STATE_ATTR = "_pytree__state"
_ARR_ENTRY = (ARR,)


def is_graph_node(value: Any) -> bool:
    """True for Objects (Modules, Rngs, ...) and Variables."""
    return isinstance(value, (Pytree, Variable))


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
class _Forced:
    """A value marked ``nnx.data`` that would otherwise be static: walked as an array leaf."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


_K_FORCED = -1
KIND[_Forced] = _K_FORCED


def _getter(positions: tuple[int, ...]) -> Callable[[tuple], tuple]:
    """``vals -> tuple(vals[p] for p in positions)``, in C for two positions or more."""
    if not positions:
        return lambda vals: ()
    if len(positions) == 1:
        p = positions[0]
        return lambda vals: (vals[p],)
    return operator.itemgetter(*positions)


class _Layout:
    """How to read one shape of Object: static names and values, walked names and values.

    ``check`` lists positions whose values must be hash-checked on every walk (their type
    does not guarantee hashability); ``forced`` lists walked positions marked ``nnx.data``.
    """

    __slots__ = ("snames", "statics", "dnames", "dynamics", "check", "forced", "tuples", "variants")

    def __init__(self, keys: tuple, vals: tuple, marks: tuple, tuple_flags: dict[int, bool]):
        static_names, data_names = marks
        statics: dict[Any, int] = {}
        dynamics: dict[Any, int] = {}
        check, forced, tuples = [], [], []
        for p, name in enumerate(keys):
            if name == _STATE_ATTR:
                continue
            v = vals[p]
            k = KIND.get(type(v))
            if k is None:
                k = kind_of(v)
            if name in static_names:
                statics[name] = p
                if k != K_STATIC and not (k == K_TUPLE and tuple_flags.get(p)):
                    check.append(p)
            elif name in data_names:
                dynamics[name] = p
                if k in (K_STATIC, K_OTHER, K_TUPLE) and v is not None:
                    forced.append(p)
            elif k == K_STATIC:
                statics[name] = p
            elif k == K_OTHER:
                statics[name] = p
                check.append(p)
            elif k == K_TUPLE:
                tuples.append(p)
                if tuple_flags.get(p, False):
                    statics[name] = p
                else:
                    dynamics[name] = p
            else:
                dynamics[name] = p
        self.snames = sorted_keys(statics)
        self.statics = _getter(tuple(statics[n] for n in self.snames))
        self.dnames = sorted_keys(dynamics)
        dpos = tuple(dynamics[n] for n in self.dnames)
        self.dynamics = _getter(dpos)
        self.check = tuple(check)
        self.forced = tuple(dpos.index(p) for p in forced) if forced else ()
        self.tuples = tuple(tuples)  # positions whose tuple's kind depends on its contents
        self.variants: dict[tuple, _Layout] = {}


_LAYOUTS: dict[tuple, _Layout] = {}
_NO_MARKS = (frozenset(), frozenset())


def _layout(keys: tuple, vals: tuple, st: Any) -> _Layout:
    """The layout of an object with these attribute names and values (cached per shape)."""
    marks = _NO_MARKS if st is None else (st.static_names, st.data_names)
    key = (keys, tuple(map(type, vals)), marks)
    base = _LAYOUTS.get(key)
    if base is None:
        if len(_LAYOUTS) > 4096:
            _LAYOUTS.clear()
        base = _LAYOUTS[key] = _Layout(keys, vals, marks, {})
    if not base.tuples:
        return base
    flags = tuple(all_static(vals[p]) for p in base.tuples)
    lay = base.variants.get(flags)
    if lay is None:
        lay = base.variants[flags] = _Layout(keys, vals, marks, dict(zip(base.tuples, flags)))
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

    __slots__ = ("objs", "vals", "lists", "dicts", "trees", "keyed", "cacheable")

    def __init__(self):
        self.objs: list[Any] = []
        self.vals: list[tuple] = []
        self.keyed: list[tuple[int, tuple]] = []
        self.lists: list[tuple[list, tuple]] = []
        self.dicts: list[tuple[dict, tuple, tuple]] = []
        self.trees: list[tuple[Any, Any, tuple]] = []
        self.cacheable = True


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
) -> FlattenResult:
    """Walks ``root`` once and returns its GraphDef, nested state dicts and bookkeeping.

    Args:
      root: any value: an Object, a Variable, or a pytree containing them.
      predicates: one predicate per output state; each leaf goes to the first that matches.
        ``None`` puts every leaf into a single state.
      filters_repr: the filters behind ``predicates``, for the error message.
      with_paths: also list the path of every leaf (``FlattenResult.paths``).
    """
    walker = _Walker(predicates, with_paths)
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
    """The state of one walk (a class, not closures: nothing of it outlives the walk)."""

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
        self.witness = Witness()
        self.states: list[dict] = [{} for _ in range(self.n_states)]
        self.stack: list[tuple] = []

    def place(self, outs: list[dict], key: Any, path: tuple, leaf: Any) -> None:
        for i, pred in enumerate(self.predicates):  # type: ignore[arg-type]
            if pred(path, leaf):
                outs[i][key] = leaf
                return
        self.unmatched.append(path)

    def path_to(self, key: Any) -> tuple:
        """The path of the child ``key`` of the node on top of the stack (for error messages,
        when the walk does not track paths)."""
        return (*(frame[4] for frame in self.stack[1:]), key)

    def open(self, value: Any, k: int, path: tuple | None, key: Any = None) -> Any:
        """Records the entry of a node or container; returns an iterator over its children.

        ``path`` is the node's path, or None when the walk does not track paths (the node is
        then the child ``key`` of the node on top of the stack).
        """
        ops = self.ops
        witness = self.witness
        if k == K_OBJ:
            self.seen[id(value)] = idx = len(self.nodes)
            self.nodes.append(value)
            d = value.__dict__
            keys = tuple(d)
            st = d.get(_STATE_ATTR)
            if st is None:
                witness.cacheable = False
            else:
                if keys[-1] != _STATE_ATTR:
                    if st.tracked:  # a kept walk may depend on this order: record the keys
                        witness.keyed.append((len(witness.objs), keys))
                    else:
                        # Put refax's entry last (no kept walk has seen this object yet): a
                        # key added later lands after it, so renaming a key (pop + insert)
                        # changes the order of the values a kept walk compares.
                        d[_STATE_ATTR] = d.pop(_STATE_ATTR)
                        keys = tuple(d)
                st.tracked = True
            vals = tuple(d.values())
            lay = _layout(keys, vals, st)
            if lay.check:
                _check_hashable(vals, lay.check, keys, self.path_to(key) if path is None else path)
            witness.objs.append(value)
            witness.vals.append(vals)
            marks = (
                None
                if st is None or not (st.static_names or st.data_names)
                else (
                    st.static_names,
                    st.data_names,
                )
            )
            ops.append((OBJ, type(value), idx, lay.snames, lay.statics(vals), lay.dnames, marks))
            children = lay.dynamics(vals)
            if lay.forced:
                children = list(children)
                for i in lay.forced:
                    children[i] = _Forced(children[i])
            return zip(lay.dnames, children)
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
        if k_root in (K_VAR, K_ARRAY):
            raise GraphStructureError(
                f"Cannot split a bare {type(root).__name__}: the State needs a path for it. "
                "Wrap it in a Module or a container, e.g. split([variable])."
            )
        if k_root in (K_STATIC, K_OTHER):  # (a root tuple is walked even when all static)
            self.ops.append((STATIC, _hashable_static(root, ())))
            return
        single, need_paths, n_states = self.single, self.need_paths, self.n_states
        seen, nodes, leaves, ops = self.seen, self.nodes, self.leaves, self.ops
        paths, place, ref_targets = self.paths, self.place, self.ref_targets
        kind_get = KIND.get
        # frames: (children iterator, path, output dicts, parent's output dicts, key in parent)
        stack = self.stack
        stack.append((self.open(root, k_root, ()), (), self.states, None, None))
        while stack:
            it, path, outs, parent_outs, parent_key = stack[-1]
            for key, v in it:
                k = kind_get(type(v))
                if k is None:
                    k = kind_of(v)
                if k == K_VAR:
                    idx = seen.get(id(v))
                    if idx is not None:
                        self.num_refs += 1
                        ref_targets.add(idx)
                        ops.append((REF, idx))
                        continue
                    seen[id(v)] = idx = len(nodes)
                    nodes.append(v)
                    leaves.append(v)
                    frozen = v._frozen
                    if frozen is None:
                        frozen = v._frozen_metadata()
                    ops.append((VAR, type(v), idx, frozen))
                    if single and paths is None:
                        outs[0][key] = v
                        continue
                    vpath = path + (key,)
                    if paths is not None:
                        paths.append(vpath)
                    if single:
                        outs[0][key] = v
                    else:
                        place(outs, key, vpath, v)
                    continue
                if k == K_STATIC:
                    ops.append((STATIC, v))
                    continue
                if k == K_ARRAY or k == _K_FORCED:
                    if k == _K_FORCED:
                        v = v.value
                    leaves.append(v)
                    ops.append(_ARR_ENTRY)
                    if single and paths is None:
                        outs[0][key] = v
                        continue
                    vpath = path + (key,)
                    if paths is not None:
                        paths.append(vpath)
                    if single:
                        outs[0][key] = v
                    else:
                        place(outs, key, vpath, v)
                    continue
                if k == K_OBJ:
                    idx = seen.get(id(v))
                    if idx is not None:
                        self.num_refs += 1
                        ref_targets.add(idx)
                        ops.append((REF, idx))
                        continue
                elif k == K_OTHER:
                    try:
                        hash(v)
                    except TypeError:
                        _hashable_static(v, self.path_to(key))
                    ops.append((STATIC, v))
                    continue
                child_path = path + (key,) if need_paths else None
                child_outs = [{}] if single else [{} for _ in range(n_states)]
                stack.append((self.open(v, k, child_path, key), child_path, child_outs, outs, key))
                break
            else:
                stack.pop()
                if parent_outs is not None:
                    for i in range(n_states):
                        if outs[i]:
                            parent_outs[i][parent_key] = outs[i]


def _filter_name(f: Any) -> str:
    return f.__name__ if isinstance(f, type) else repr(f)
