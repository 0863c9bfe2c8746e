"""The object graph <-> (GraphDef, state) boundary: one depth-first walk each way.

``flatten`` visits a value once, depth first, attributes in sorted order, remembering every graph
node (Object or Variable) by identity: the first visit records the node, later visits record a
reference to its index (this preserves sharing and allows cycles). State leaves (Variables and
raw arrays) are placed into nested dicts by path, one dict per filter.

``unflatten`` interprets a GraphDef encoding, pulling leaves out of nested state dicts by key
in the same order; it can reuse existing objects by node index (``existing``), which is how
updates made inside a transform flow back into the caller's objects.
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
    K_SKIP,
    K_STATIC,
    K_TREE,
    K_TUPLE,
    K_VAR,
    KIND,
    all_static,
    is_static_value,
    kind_of,
)
from refax._object import ObjectState, Pytree
from refax._statelib import State
from refax._tracers import bump_epoch, current_trace
from refax._variables import Variable, _set_frozen, _set_meta, _set_raw
from refax.errors import FilterError, GraphStructureError, UnhashableStaticError

_STATE_ATTR = "_pytree__state"
_MISSING = object()

_KIND = KIND
_KIND[ObjectState] = K_SKIP


def is_graph_node(value: Any) -> bool:
    """True for Objects (Modules, Rngs, ...) and Variables."""
    return isinstance(value, (Pytree, Variable))


def _path_str(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path) or "<root>"


def _sorted_keys(d: dict) -> list:
    try:
        return sorted(d)
    except TypeError:
        return list(d)


def _tree_children(value: Any) -> tuple[Any, list[Any], list[Any]]:
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
    return treedef, keys, [c for _, c in flat]


class FlattenResult:
    """Everything one walk produced."""

    __slots__ = ("graphdef", "states", "nodes", "leaves", "snapshots", "num_refs", "paths")

    def __init__(self, graphdef, states, nodes, leaves, snapshots, num_refs=0):
        self.graphdef: GraphDef = graphdef
        self.states: list[dict] = states
        self.nodes: list[Any] = nodes
        self.leaves: list[Any] = leaves
        self.snapshots: list[tuple[Any, tuple]] = snapshots
        self.num_refs = num_refs
        self.paths: list[tuple] | None = None


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
    """
    seen: dict[int, int] = {}
    nodes: list[Any] = []
    leaves: list[Any] = []
    snapshots: list[tuple[Any, tuple]] = []
    n_states = 1 if predicates is None else len(predicates)
    unmatched: list[tuple] = []
    refs: list[int] = []
    kind_table = _KIND
    single = predicates is None
    paths: list[tuple] | None = [] if with_paths else None

    # ``outs`` holds, for the node being walked, one output dict per state; leaves are stored
    # under their key, sub-nodes get fresh dicts that are attached only when non-empty.
    def place(outs: list[dict], key: Any, path: tuple, leaf: Any) -> None:
        if single:
            outs[0][key] = leaf
            return
        for i, pred in enumerate(predicates):  # type: ignore[arg-type]
            if pred(path, leaf):
                outs[i][key] = leaf
                return
        unmatched.append(path)

    def child(value: Any, key: Any, path: tuple, outs: list[dict], k: int) -> tuple:
        """Encodes a non-static child ``value`` found under ``key`` of the current node."""
        if k == K_VAR:
            vid = id(value)
            idx = seen.get(vid)
            if idx is not None:
                refs.append(idx)
                return (REF, idx)
            idx = seen[vid] = len(nodes)
            nodes.append(value)
            leaves.append(value)
            if paths is not None:
                paths.append(path)
            if single:
                outs[0][key] = value
            else:
                place(outs, key, path, value)
            frozen = value._frozen
            if frozen is None:
                frozen = value._frozen_metadata()
            return (VAR, type(value), idx, frozen)
        if k == K_ARRAY:
            leaves.append(value)
            if paths is not None:
                paths.append(path)
            place(outs, key, path, value)
            return (ARR,)
        if k == K_OBJ and id(value) in seen:
            idx = seen[id(value)]
            refs.append(idx)
            return (REF, idx)
        if single:
            sub = [{}]
            enc = walk(value, path, sub, k)
            if sub[0]:
                outs[0][key] = sub[0]
            return enc
        sub = [{} for _ in range(n_states)]
        enc = walk(value, path, sub, k)
        for i in range(n_states):
            if sub[i]:
                outs[i][key] = sub[i]
        return enc

    def walk(value: Any, path: tuple, outs: list[dict], k: int) -> tuple:
        if k == K_OBJ:
            idx = seen[id(value)] = len(nodes)
            nodes.append(value)
            d = value.__dict__
            st: ObjectState | None = d.get(_STATE_ATTR)
            if st is not None:
                st.tracked = True
                snames_t, svals_t, dnames = layout(d, st, path)
                static_names, data_names = st.static_names, st.data_names
            else:
                snames_t, svals_t, dnames = _classify(d, frozenset(), frozenset(), path)
                static_names = data_names = frozenset()
            dyn: list[tuple[Any, tuple]] = []
            out0 = outs[0]
            for name in dnames:
                v = d[name]
                kv = kind_table.get(type(v))
                if kv is None:
                    kv = kind_of(v)
                if kv == K_VAR:  # inlined: the most common dynamic attribute
                    vid = id(v)
                    vidx = seen.get(vid)
                    if vidx is None:
                        vidx = seen[vid] = len(nodes)
                        nodes.append(v)
                        leaves.append(v)
                        if paths is not None:
                            paths.append(path + (name,))
                        if single:
                            out0[name] = v
                        else:
                            place(outs, name, path + (name,), v)
                        frozen = v._frozen
                        if frozen is None:
                            frozen = v._frozen_metadata()
                        dyn.append((name, (VAR, type(v), vidx, frozen)))
                    else:
                        refs.append(vidx)
                        dyn.append((name, (REF, vidx)))
                elif name in data_names and kv in (K_STATIC, K_OTHER, K_TUPLE) and v is not None:
                    dyn.append((name, child(v, name, path + (name,), outs, K_ARRAY)))
                elif kv == K_STATIC or kv == K_OTHER or name in static_names:
                    # a static value under a dynamic name (the object's __dict__ was written
                    # directly): still correct, encoded in place
                    dyn.append((name, (STATIC, _hashable(v, path + (name,)))))
                elif kv == K_TUPLE and all_static(v):
                    dyn.append((name, (STATIC, v)))
                elif kv == K_SKIP:
                    continue
                else:
                    dyn.append((name, child(v, name, path + (name,), outs, kv)))
            marks = (static_names, data_names) if static_names or data_names else None
            return (OBJ, type(value), idx, snames_t, svals_t, tuple(dyn), marks)
        if k == K_LIST or k == K_TUPLE:
            if k == K_LIST:
                snapshots.append((value, tuple(value)))
            encs = []
            for i, v in enumerate(value):
                kv = kind_table.get(type(v))
                if kv is None:
                    kv = kind_of(v)
                if kv == K_STATIC:
                    encs.append((STATIC, v))
                elif kv == K_OTHER:
                    encs.append((STATIC, _hashable(v, path + (i,))))
                else:
                    encs.append(child(v, i, path + (i,), outs, kv))
            return (LIST if k == K_LIST else TUPLE, tuple(encs))
        if k == K_DICT or k == K_TREE:
            if k == K_DICT:
                snapshots.append((value, (*value, *value.values())))
                keys = list(value)
                children = list(value.values())
            else:
                treedef, keys, children = _tree_children(value)
                if isinstance(value, State):  # its items live in one plain dict
                    m = value._mapping
                    snapshots.append((m, (*m, *m.values())))
                elif not isinstance(value, tuple):  # mutable containers (OrderedDict, ...)
                    snapshots.append((value, tuple(children)))
            encs = []
            for key, v in zip(keys, children):
                kv = kind_table.get(type(v))
                if kv is None:
                    kv = kind_of(v)
                if kv == K_STATIC:
                    encs.append((STATIC, v))
                elif kv == K_OTHER:
                    encs.append((STATIC, _hashable(v, path + (key,))))
                else:
                    encs.append(child(v, key, path + (key,), outs, kv))
            if k == K_DICT:
                return (DICT, tuple(keys), tuple(encs))
            return (TREE, treedef, tuple(keys), tuple(encs))
        raise AssertionError(k)  # pragma: no cover

    states: list[dict] = [{} for _ in range(n_states)]
    k_root = kind_of(root)
    if k_root in (K_VAR, K_ARRAY):
        raise GraphStructureError(
            f"Cannot split a bare {type(root).__name__}: the State needs a path for it. Wrap "
            "it in a Module or a container, e.g. split([variable])."
        )
    if k_root in (K_STATIC, K_OTHER, K_SKIP):
        enc = (STATIC, _hashable(root, ()))
    else:
        enc = walk(root, (), states, k_root)
    if unmatched:
        shown = ", ".join(repr(_path_str(p)) for p in unmatched[:5])
        more = f" (and {len(unmatched) - 5} more)" if len(unmatched) > 5 else ""
        raise FilterError(
            f"Non-exhaustive filters, got a non-empty remainder: {shown}{more} matched none of "
            f"the filters ({', '.join(_filter_name(f) for f in filters_repr)}). Add `...` as "
            "the last filter to collect the rest."
        )
    result = FlattenResult(
        GraphDef(enc, len(leaves), len(nodes)), states, nodes, leaves, snapshots, len(refs)
    )
    result.paths = paths
    return result


def _sorted(keys: Any) -> tuple:
    """Attribute names in canonical (sorted) order; mixed key types sort by type name first."""
    try:
        return tuple(sorted(keys))
    except TypeError:
        try:
            return tuple(sorted(keys, key=lambda k: (type(k).__name__, k)))
        except TypeError:
            return tuple(keys)


def _classify(d: dict, static_names: frozenset, data_names: frozenset, path: tuple) -> tuple:
    """Splits an object's attributes into sorted static names/values and dynamic names."""
    statics = {}
    dynamic = []
    for name, v in d.items():
        if name == _STATE_ATTR:
            continue
        if name in data_names:
            dynamic.append(name)
        elif name in static_names:
            statics[name] = _hashable(v, (*path, name))
        elif is_static_value(v):
            statics[name] = v
        else:
            dynamic.append(name)
    snames = _sorted(statics)
    return snames, tuple(statics[n] for n in snames), _sorted(dynamic)


def layout(d: dict, st: ObjectState, path: tuple) -> tuple:
    """The object's (static names, static values, dynamic names), cached on its ObjectState.

    Kinds are recorded on assignment (``ObjectState.record``); the cache is trusted while the
    recorded tables account for every attribute.
    """
    lay = st.layout
    statics, dynamic = st.statics, st.dynamic
    if statics is not None and dynamic is not None and len(statics) + len(dynamic) + 1 == len(d):
        if lay is None:
            snames = _sorted(statics)
            lay = st.layout = (snames, tuple(statics[n] for n in snames), _sorted(dynamic))
        return lay
    lay = _classify(d, st.static_names, st.data_names, path)
    st.statics = dict(zip(lay[0], lay[1]))
    st.dynamic = dict.fromkeys(lay[2])
    st.shared = False
    st.layout = lay
    return lay


def _filter_name(f: Any) -> str:
    return f.__name__ if isinstance(f, type) else repr(f)


def _hashable(value: Any, path: tuple) -> Any:
    try:
        hash(value)
    except TypeError:
        raise UnhashableStaticError(
            f"Static attribute '{_path_str(path)}' holds an unhashable "
            f"{type(value).__name__}: static values go into the GraphDef and must be hashable. "
            "Use a hashable type (e.g. a tuple), or store arrays in a Variable or wrap the value "
            "with nnx.data(...)."
        ) from None
    return value


def snapshots_valid(snapshots: list[tuple[Any, tuple]]) -> bool:
    """True when no container seen by a walk was changed since (identity comparison)."""
    for container, snap in snapshots:
        t = type(container)
        if t is list:
            now = tuple(container)
        elif t is dict:
            now = (*container, *container.values())
        else:
            try:
                now = tuple(_tree_children(container)[2])
            except Exception:
                return False
        if len(now) != len(snap) or not all(map(operator.is_, now, snap)):
            return False
    return True


# -- unflatten -------------------------------------------------------------------------------
def _as_dict(state: Any) -> Any:
    """The nested dict behind a State (dicts pass through; leaves are returned unchanged)."""
    if type(state) is dict:
        return state
    if isinstance(state, State):
        return state._mapping
    return state


def merge_dicts(dicts: Sequence[Any]) -> Any:
    """Deep-merges nested state dicts (later wins); returns the first when there is one."""
    dicts = [_as_dict(d) for d in dicts]
    if len(dicts) == 1:
        return dicts[0]
    out: dict = {}
    for d in dicts:
        _merge_into(out, d)
    return out


def _merge_into(out: dict, d: Any) -> None:
    for k, v in d.items():
        v = _as_dict(v)
        if type(v) is dict:
            sub = out.get(k)
            if type(sub) is not dict:
                sub = out[k] = {}
            _merge_into(sub, v)
        else:
            out[k] = v


def unflatten(
    graphdef: GraphDef,
    state: Any,
    *,
    copy_variables: bool = False,
    existing: dict[int, Any] | None = None,
    flat: bool = False,
    nodes_out: list[Any] | None = None,
) -> Any:
    """Builds the graph described by ``graphdef``, taking leaves from the nested ``state`` dict.

    Args:
      graphdef: the structure.
      state: a nested dict (or State) of leaves keyed like the graph's paths; with
        ``flat=True``, a sequence of leaves in walk order (as ``flatten`` lists them).
      copy_variables: build new Variables even when the state holds Variables.
      existing: node index -> object to update in place instead of creating a new one.
      nodes_out: if given, receives the built nodes by index.
    """
    nodes: list[Any] = [None] * graphdef.num_nodes if nodes_out is None else nodes_out
    if nodes_out is not None:
        nodes_out[:] = [None] * graphdef.num_nodes
    leaf_iter = iter(state) if flat else None
    changed = [False]
    trace = current_trace()

    def extra_keys(sub: Any, expected: list, path: tuple) -> None:
        extra = [k for k in sub if k not in expected]
        if extra:
            shown = ", ".join(repr(_path_str((*path, k))) for k in extra[:5])
            raise GraphStructureError(
                f"The State does not fit the GraphDef: it has values at {shown} that the "
                "GraphDef does not use. Pass the States that split() returned for this "
                "GraphDef."
            )

    def missing(path: tuple, what: str) -> GraphStructureError:
        return GraphStructureError(
            f"The State does not fit the GraphDef: no value for {what} at "
            f"'{_path_str(path)}'. Pass every State that split() returned for this GraphDef."
        )

    def leaf_value(sub: Any) -> Any:
        return sub._raw_value if isinstance(sub, Variable) else sub

    def build(enc: tuple, sub: Any, path: tuple) -> Any:
        op = enc[0]
        if op == STATIC:
            return enc[1]
        if op == REF:
            return nodes[enc[1]]
        if op == VAR:
            if leaf_iter is not None:
                sub = next(leaf_iter)
            if sub is _MISSING:
                raise missing(path, f"{enc[1].__name__} Variable")
            idx = enc[2]
            target = existing.get(idx) if existing is not None else None
            if target is not None:
                if target is not sub:
                    _set_raw(target, leaf_value(sub))
                    if target._var_metadata != enc[3].mapping:
                        _set_meta(target, dict(enc[3].mapping))
                        _set_frozen(target, None)
                        changed[0] = True
                var = target
            elif isinstance(sub, Variable) and not copy_variables:
                var = sub
            else:
                var = enc[1]._from_parts(leaf_value(sub), enc[3].mapping, enc[3])
            nodes[idx] = var
            return var
        if op == ARR:
            if leaf_iter is not None:
                sub = next(leaf_iter)
            if sub is _MISSING:
                raise missing(path, "an array")
            return leaf_value(sub)
        if op == OBJ:
            cls, idx, snames, svals, dyn, marks = enc[1:]
            target = existing.get(idx) if existing is not None else None
            if target is not None:
                obj = target
                target.__dict__[_STATE_ATTR].invalidate()
            else:
                obj = object.__new__(cls)
                dnames = tuple(name for name, _ in dyn)
                st = obj.__dict__[_STATE_ATTR] = ObjectState._fresh(
                    trace, dict(zip(snames, svals)), dict.fromkeys(dnames), (snames, svals, dnames)
                )
                if marks is not None:
                    st.static_names, st.data_names = marks
            nodes[idx] = obj
            sub = _as_dict(sub) if sub is not _MISSING else _EMPTY
            values = dict(zip(snames, svals))
            found = 0
            for name, c in dyn:
                v = sub.get(name, _MISSING)
                if v is not _MISSING:
                    found += 1
                values[name] = build(c, v, path + (name,))
            if found != len(sub) and leaf_iter is None:
                extra_keys(sub, [name for name, _ in dyn], path)
            d = obj.__dict__
            if target is not None:
                for name in [n for n in d if n != _STATE_ATTR and n not in values]:
                    del d[name]
                    changed[0] = True
                for name, v in values.items():
                    if d.get(name, _MISSING) is not v:
                        d[name] = v
                        changed[0] = True
            else:
                d.update(values)
            return obj
        sub = _as_dict(sub) if sub is not _MISSING else _EMPTY
        if op == LIST or op == TUPLE:
            keys, encs = range(len(enc[1])), enc[1]
        elif op == DICT:
            keys, encs = enc[1], enc[2]
        elif op == TREE:
            keys, encs = enc[2], enc[3]
        else:  # pragma: no cover
            raise GraphStructureError(f"Corrupt GraphDef entry {enc!r}")
        if sub and leaf_iter is None:
            extra_keys(sub, list(keys), path)
        out = [build(c, sub.get(k, _MISSING), path + (k,)) for k, c in zip(keys, encs)]
        if op == LIST:
            return out
        if op == TUPLE:
            return tuple(out)
        if op == DICT:
            return dict(zip(keys, out))
        return jax.tree_util.tree_unflatten(enc[1], out)

    root_enc = graphdef.root
    if root_enc[0] in (VAR, ARR):
        raise GraphStructureError("A GraphDef of a bare Variable or array cannot be merged.")
    out = build(root_enc, _MISSING if flat else state, ())
    if changed[0]:
        bump_epoch()
    return out


class _Empty(dict):
    def get(self, key: Any, default: Any = None) -> Any:
        return default


_EMPTY = _Empty()
