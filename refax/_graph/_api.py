"""The public graph functions: split, merge, update, state, graphdef, clone, pop, iteration.

All of them sit on the single walk in ``_flatten.py`` and the cache in ``_cache.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from refax._config import graph_mode_default
from refax._filters import filters_to_predicates, to_predicate
from refax._graph import _cache, _graphdef
from refax._graph._flatten import (
    FlattenResult,
    flatten,
    is_graph_node,
    sorted_keys,
    tree_children,
)
from refax._graph._graphdef import ARR, VAR, GraphDef, _CallProxy
from refax._graph._plan import _Mismatch, run_plan
from refax._graph._unflatten import as_dict, merge_dicts, unflatten
from refax._object import _STATE_ATTR, Pytree
from refax._statelib import FlatState, State, from_flat_state
from refax._tracers import EPOCH, current_trace
from refax._variables import Variable, _set_raw
from refax.errors import GraphStructureError

A = TypeVar("A")
_API_KEY = "api"  # key prefix of split/state/graphdef walks in ObjectState.walks
_MISSING_ARG: Any = object()


def _normalize_filters(filters: tuple) -> tuple:
    if len(filters) == 1 and (filters[0] is Ellipsis or filters[0] is True):
        return ()
    return filters


def _check_tree_mode(result: FlattenResult, graph: bool | None, node: Any) -> bool:
    """Raises if ``graph`` resolves to tree mode and the walk met a node twice (or an object
    that is not a pytree); returns the resolved mode."""
    if graph is None:
        graph = graph_mode_default()
    if not graph:
        if result.num_refs:
            raise tree_mode_error(node)
        refs = [leaf for leaf in result.leaves if type(leaf) is jax.Ref]
        if len({id(r) for r in refs}) != len(refs):
            raise ValueError(
                "Tree mode (graph=False) does not support shared references: the same "
                "jax.Ref is found at paths more than once. Pass graph=True or remove the "
                "sharing."
            )
        for path, value in _not_pytrees(node):
            raise not_a_pytree_error(value, path)
    return graph


def _not_pytrees(node: Any) -> Iterator[tuple[tuple, Any]]:
    """The objects declared ``pytree=False`` reachable from ``node``, with their paths."""
    for path, value in iter_graph(node):
        if isinstance(value, Pytree) and not type(value)._refax_pytree:
            yield path, value


def not_a_pytree_error(value: Any, path: tuple) -> ValueError:
    shown = "/".join(str(k) for k in path) or "<root>"
    return ValueError(
        f"{type(value).__name__} is declared with pytree=False, so tree mode (graph=False) "
        f"cannot walk it. Found at path: {shown}. Pass graph=True, or make the class a "
        "pytree (subclass nnx.Pytree / nnx.Module without pytree=False)."
    )


def tree_mode_error(node: Any, what: str = "split") -> ValueError:
    """The error for a shared reference or a cycle met in tree mode (``graph=False``)."""
    groups = find_duplicates(node)
    shown = ""
    if groups:
        paths = groups[0]
        value = node
        for key in paths[0]:
            value = value.__dict__[key] if isinstance(value, Pytree) else value[key]
        listed = "\n".join(f"  - {'/'.join(str(k) for k in p) or '<root>'}" for p in paths)
        shown = f": the same {type(value).__name__} is found at paths:\n\n{listed}\n\n"
    return ValueError(
        f"Tree mode (graph=False) does not support shared references or cycles ({what})"
        f"{shown or '. '}Pass graph=True (graph mode keeps sharing), or remove the sharing."
    )


def _tree(graphdef: GraphDef, graph: bool) -> GraphDef:
    """The GraphDef as a tree-mode one (its ``nodes`` describe a pytree) when ``graph`` is
    False; the same structure, and equal to the graph-mode one."""
    if graph or graphdef.tree:
        return graphdef
    twin = GraphDef(graphdef.ops, graphdef.num_leaves, graphdef.num_nodes, graphdef.outer, True)
    twin._plan = graphdef._plan
    return twin


def _walk_owned(node: Any, filters: tuple) -> tuple[FlattenResult, bool]:
    """Walks ``node`` (or reuses a kept walk); the bool says whether the caller owns the
    result's state dicts (True) or must copy them because the cache keeps them (False).

    A root's walk is kept from its second walk on, so a one-off split pays no copy.
    """
    filters = _normalize_filters(filters)
    key = None
    if isinstance(node, Pytree):
        fkey = _cache.filters_key(filters)
        if fkey is not None:
            key = (_API_KEY, fkey)
            entry = _cache.lookup((node,), key)
            if entry is not None:
                return entry.result, False
    epoch = EPOCH.value
    preds = list(filters_to_predicates(filters)) if filters else None
    result = flatten(node, preds, filters_repr=filters)
    if key is not None and _cache.seen_before((node,), key):
        kept = FlattenResult(
            result.graphdef, result.states, None, list(result.leaves), None, result.num_refs
        )
        _cache.store((node,), key, result, epoch, (0,), kept)
        return result, False
    return result, True


def _walk(node: Any, filters: tuple) -> FlattenResult:
    """A walk whose state dicts the caller must not mutate."""
    return _walk_owned(node, filters)[0]


def _states(result: FlattenResult, owned: bool) -> list[Any]:
    if result.graphdef.ops[0][0] in (VAR, ARR):  # a bare leaf: it is its own state
        return [s[None] if None in s else State({}) for s in result.states]
    if owned:
        return [State._from_dict_unsafe(s) for s in result.states]
    # the cache keeps these dicts: the States copy them on their first write
    return [State._copy_on_write(s) for s in result.states]


def split(node: A, *filters: Any, graph: bool | None = None) -> tuple[Any, ...]:
    """Splits a graph into its GraphDef and one State per filter.

    Each Variable goes to the first filter that matches it; filters must be exhaustive (end
    with ``...`` to collect the rest). The States hold the model's own Variable objects.

    Args:
      node: an Object, or a pytree of Objects (e.g. ``(model, optimizer)``).
      *filters: filters partitioning the state; none means a single State.
      graph: tree mode when False (shared references are an error).

    Returns:
      ``(graphdef, state)`` or ``(graphdef, state_1, ..., state_n)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> class Count(nnx.Variable): pass
      >>> class M(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(2))
      ...     self.n = Count(jnp.array(0))
      >>> graphdef, params, counts = nnx.split(M(), nnx.Param, Count)
      >>> list(params), list(counts)
      (['w'], ['n'])
    """
    result, owned = _walk_owned(node, filters)
    graph = _check_tree_mode(result, graph, node)
    return (_tree(result.graphdef, graph), *_states(result, owned))


def state(node: Any, *filters: Any, graph: bool | None = None) -> Any:
    """Returns the State of ``node``, or one State per filter (unlike ``split``, the filters
    need not cover everything: unmatched Variables are left out).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> class M(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(2))
      ...     self.mean = nnx.BatchStat(jnp.zeros(2))
      >>> list(nnx.state(M(), nnx.BatchStat))
      ['mean']
    """
    if filters and _normalize_filters(filters):
        result, owned = _walk_owned(node, (*filters, ...))
        states = _states(result, owned)[:-1]
    else:
        result, owned = _walk_owned(node, ())
        states = _states(result, owned)
    _check_tree_mode(result, graph, node)
    return states[0] if len(states) == 1 else tuple(states)


variables = state


def graphdef(node: Any, *, graph: bool | None = None) -> GraphDef:
    """Returns only the GraphDef of ``node``."""
    result = _walk(node, ())
    graph = _check_tree_mode(result, graph, node)
    return _tree(result.graphdef, graph)


def merge(
    graphdef: GraphDef | Any = _MISSING_ARG,
    state: Any = _MISSING_ARG,
    /,
    *states: Any,
    copy: bool = False,
    recreate_variables: bool = True,
    graph: bool | None = None,
) -> Any:
    """Rebuilds objects from a GraphDef and the State(s) that ``split`` produced.

    Variables in the States are reused (so the merged object shares them) unless
    ``copy=True``. A raw value where the GraphDef has a Variable is wrapped in a new Variable
    of that type, unless ``recreate_variables=False`` (then it is placed as it is). The first
    argument may also be a :class:`GraphState` (what ``unpack`` returns): then every argument
    must be one, with the same GraphDef.

    Raises:
      GraphStructureError: when a State lacks a value the GraphDef needs or has extra ones.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> graphdef, state = nnx.split(model)
      >>> copy = nnx.merge(graphdef, state)
      >>> copy is model, copy.kernel is model.kernel
      (False, True)
    """
    if graphdef is _MISSING_ARG:
        raise TypeError("merge() missing 1 required positional argument: 'graphdef'")
    if isinstance(graphdef, GraphState):
        parts = (state, *states) if state is not _MISSING_ARG else states
        for other in parts:
            if not isinstance(other, GraphState):
                raise ValueError(
                    f"Expected GraphState objects after a GraphState, got "
                    f"{type(other).__name__}: pass what unpack() returned, e.g. "
                    "merge(*nnx.unpack(node, ...))."
                )
            if other._graphdef != graphdef._graphdef:
                raise ValueError(
                    "The GraphDef must be the same for every GraphState passed to merge: "
                    "these come from different graphs. Merge the GraphStates of one unpack()."
                )
        graphdef, state, states = (
            graphdef._graphdef,
            graphdef._state,
            tuple(p._state for p in parts),
        )
    if state is _MISSING_ARG:
        raise TypeError(
            "merge() missing 1 required positional argument: 'state' (pass the State(s) "
            "split() returned with this GraphDef)"
        )
    if not isinstance(graphdef, GraphDef):
        raise TypeError(
            f"merge expects a GraphDef as first argument, got {type(graphdef).__name__}; "
            "call it as merge(graphdef, state, ...)."
        )
    parts = [_part(s) for s in (state, *states)]
    if graphdef.ops[0][0] in (VAR, ARR):  # a bare leaf: the one part that holds it
        leaf = [p for p in parts if not (isinstance(p, (State, dict)) and not p)]
        merged = leaf[0] if len(leaf) == 1 else merge_dicts(parts)
    else:
        merged = merge_dicts(parts)
    if not recreate_variables:
        return unflatten(graphdef, merged, copy_variables=copy, recreate_variables=False)
    return _build(graphdef, merged, copy)


def _part(s: Any) -> Any:
    """One argument of merge as a nested dict (or a bare leaf)."""
    if isinstance(s, GraphState):
        return s._state
    if isinstance(s, FlatState):
        leaves = s.leaves
        if len(leaves) == 1 and s.paths == ((),):  # a bare leaf's flat state
            return leaves[0]
        return from_flat_state(s)
    return s


def _build(graphdef: GraphDef, state: dict, copy: bool) -> Any:
    """Fresh objects from a nested state dict: the compiled plan, or the interpreter's error."""
    try:
        return run_plan(graphdef, state, copy)
    except _Mismatch:
        return unflatten(graphdef, state, copy_variables=copy)


def _flat_paths(d: Any) -> list[tuple]:
    """The paths of the leaves of a nested state dict."""
    out = []
    stack = [((), as_dict(d))]
    while stack:
        prefix, level = stack.pop()
        for k, v in level.items():
            v = as_dict(v)
            if type(v) is dict:
                stack.append(((*prefix, k), v))
            else:
                out.append((*prefix, k))
    return out


def update(node: Any, state: Any, /, *states: Any, graph: bool | None = None) -> None:
    """Writes the values of State(s) into the Variables of ``node`` in place.

    Raises:
      GraphStructureError: naming the path when the State has a key ``node`` lacks.
    """
    trace = current_trace()
    if isinstance(node, Variable):  # a bare Variable: its one (non-empty) state
        for s in (state, *states):
            if isinstance(s, Variable):
                _write_variable(node, s, trace)
            elif not isinstance(s, (State, dict, GraphState)):
                _write_variable(node, s, trace)
        return
    for s in (state, *states):
        if isinstance(s, GraphState):
            s = s._state
        _update(node, as_dict(s), trace)


# an update frame, as a list: [node, its __dict__ / the dict / list, or None for an
# immutable container, items of the state level, path, its children (immutable containers,
# rebuilt when one changed), key -> child index, whether a child changed]
def _update_frame(node: Any, d: dict, path: tuple) -> list[Any]:
    if isinstance(node, Pytree):
        return [node, node.__dict__, iter(d.items()), path, None, None, False]
    if isinstance(node, (dict, list)):
        return [node, node, iter(d.items()), path, None, None, False]
    _, keys, children = tree_children(node)
    index = {k: i for i, k in enumerate(keys)}
    return [node, None, iter(d.items()), path, list(children), index, False]


def _current(frame: list[Any], key: Any) -> Any:
    holder = frame[1]
    if holder is None:
        i = frame[5].get(key)
        return frame[4][i] if i is not None else _MISSING
    if type(holder) is list:
        return holder[key] if isinstance(key, int) and 0 <= key < len(holder) else _MISSING
    if key == _STATE_ATTR and holder is not frame[0]:
        return _MISSING
    return holder.get(key, _MISSING)


def _put(frame: list[Any], key: Any, new: Any) -> None:
    node, holder = frame[0], frame[1]
    if holder is None:
        frame[4][frame[5][key]] = new
        frame[6] = True
    elif isinstance(node, Pytree):
        setattr(node, key, new)
    else:
        holder[key] = new


def _done(frame: list[Any]) -> Any:
    """The node, or a rebuilt copy when it is an immutable container whose children changed."""
    node = frame[0]
    if not frame[6]:
        return node
    return jax.tree_util.tree_unflatten(tree_children(node)[0], frame[4])


def _update(node: Any, d: dict, trace: Any) -> None:
    """Writes the nested state ``d`` into ``node`` (immutable containers inside are rebuilt
    with their updated children and put back into their parent). Iterative: any depth."""
    stack = [(_update_frame(node, d, ()), None)]
    while stack:
        frame, key_in_parent = stack[-1]
        holder = frame[1]
        is_object = holder is not None and holder is not frame[0]
        for key, sub in frame[2]:
            if type(sub) is not dict and isinstance(sub, State):
                sub = sub._mapping
            if is_object and key != _STATE_ATTR:
                current = holder.get(key, _MISSING)
            else:
                current = _current(frame, key)
            if current is _MISSING:
                raise GraphStructureError(
                    f"Cannot update {type(frame[0]).__name__} at "
                    f"'{'.'.join(map(str, (*frame[3], key)))}': the object has no such "
                    "attribute or item. Update with a State split from this object, or merge "
                    "into a new object instead."
                )
            if isinstance(current, Variable):
                if sub is not current:
                    _write_variable(current, sub, trace)
                continue
            if type(sub) is dict:
                stack.append((_update_frame(current, sub, (*frame[3], key)), key))
                break
            new = sub.get_value() if isinstance(sub, Variable) else sub
            if new is not current:
                _put(frame, key, new)
        else:
            stack.pop()
            if stack and frame[1] is None:  # an immutable container: put back if rebuilt
                new = _done(frame)
                parent = stack[-1][0]
                if new is not _current(parent, key_in_parent):
                    _put(parent, key_in_parent, new)


def _write_variable(current: Variable, sub: Any, trace: Any) -> None:
    sp = current._special
    if sp is not None and sp.refs and not isinstance(sub, Variable):
        current.set_raw_value(sub)  # into its JAX references, if it has some (JAX checks those)
        return
    ts = current._trace_state
    if ts is not trace and ts != trace:
        current._check_trace()  # raises TraceContextError
    if isinstance(sub, Variable):
        _set_raw(current, sub._raw_value)
        meta = sub._var_metadata
        if meta is not current._var_metadata and meta != current._var_metadata:
            current.set_metadata(dict(meta))
    else:
        _set_raw(current, sub)


_MISSING = object()


def clone(node: A, variables: bool = True, *, arrays: bool = False, graph: bool | None = None) -> A:
    """Deep copy of ``node`` via split/merge: new Objects, sharing preserved.

    Variables are copied too unless ``variables=False`` (then the copy holds the same
    Variable objects); array buffers are shared unless ``arrays=True`` (needed before
    donating buffers).

    Example:
      >>> from refax import nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> copy = nnx.clone(model)
      >>> copy is model, copy.kernel is model.kernel
      (False, False)
    """
    result = _walk(node, ())
    _check_tree_mode(result, graph, node)
    st = result.states[0]
    if result.graphdef.ops[0][0] in (VAR, ARR):
        st = st[None]
    if arrays:
        st = jax.tree.map(lambda x: jnp.array(x, copy=True), State._from_dict_unsafe(st))
        st = st._mapping
    return _build(result.graphdef, st, variables)


def pop(node: Any, *filters: Any) -> Any:
    """Removes the Variables matching ``filters`` from ``node`` and returns them as State(s)."""
    if not filters:
        raise TypeError("pop needs at least one filter, e.g. nnx.pop(model, nnx.Intermediate).")
    result = flatten(node, [to_predicate(f) for f in (*filters, ...)], filters_repr=filters)
    states = [State._from_dict_unsafe(s) for s in result.states[:-1]]
    for s in states:
        for path in sorted(_flat_paths(s), reverse=True):
            parent = node
            for key in path[:-1]:
                parent = getattr(parent, key) if isinstance(parent, Pytree) else parent[key]
            if isinstance(parent, Pytree):
                delattr(parent, path[-1])
            else:
                del parent[path[-1]]
    return states[0] if len(states) == 1 else tuple(states)


# -- iteration ------------------------------------------------------------------------------
def _children(node: Any) -> list[tuple[Any, Any]]:
    if isinstance(node, Pytree):
        d = node.__dict__
        return [(k, d[k]) for k in sorted_keys([k for k in d if k != _STATE_ATTR])]
    if isinstance(node, dict):
        return [(k, node[k]) for k in sorted_keys(list(node))]
    if isinstance(node, (list, tuple)):
        return list(enumerate(node))
    return []


def _is_container(x: Any) -> bool:
    return isinstance(x, (list, tuple, dict))


def iter_graph(node: Any, *, graph: bool | None = None) -> Iterator[tuple[tuple, Any]]:
    """Yields ``(path, value)`` for every node and leaf reachable from ``node``.

    Shared objects are visited once; children come before their parent (the root is last).
    In tree mode (``graph=False``) an object reached twice (shared, or a cycle) is an error,
    and so is an object declared ``pytree=False``.

    Example:
      >>> from refax import nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> [path for path, value in nnx.iter_graph(model) if isinstance(value, nnx.Param)]
      [('bias',), ('kernel',)]
    """
    tree_mode = not (graph_mode_default() if graph is None else graph)
    seen: dict[int, tuple] = {}
    stack: list[list[Any]] = [[node, (), None]]  # [value, path, children iterator]
    while stack:
        frame = stack[-1]
        value, path, it = frame
        if it is None:
            if is_graph_node(value):
                if id(value) in seen:
                    if tree_mode:
                        raise _met_twice(value, seen[id(value)], path)
                    stack.pop()
                    continue
                seen[id(value)] = path
                if tree_mode and isinstance(value, Pytree) and not type(value)._refax_pytree:
                    raise not_a_pytree_error(value, path)
            has_children = isinstance(value, Pytree) or _is_container(value)
            it = frame[2] = iter(_children(value) if has_children else ())
        for key, child in it:
            stack.append([child, (*path, key), None])
            break
        else:
            stack.pop()
            yield path, value


def _met_twice(value: Any, first: tuple, second: tuple) -> ValueError:
    def show(path: tuple) -> str:
        return "/".join(str(k) for k in path) or "<root>"

    return ValueError(
        f"Tree mode (graph=False) does not support shared references or cycles: the same "
        f"{type(value).__name__} is found at paths:\n\n  - {show(first)}\n  - {show(second)}"
        "\n\nPass graph=True (graph mode keeps sharing), or remove the sharing."
    )


def iter_children(node: Any, *, graph: bool | None = None) -> Iterator[tuple[Any, Any]]:
    """Yields ``(key, child)`` for the immediate graph-node children of ``node``."""
    tree_mode = not (graph_mode_default() if graph is None else graph)
    if tree_mode and isinstance(node, Pytree) and not type(node)._refax_pytree:
        raise not_a_pytree_error(node, ())
    for key, value in _children(node):
        if is_graph_node(value):
            yield key, value


def find_duplicates(node: Any, /, *, only: Any = ...) -> list[list[tuple]]:
    """Lists groups of paths that reach the same Object or Variable (those matching the
    filter ``only``, by default all of them).

    Example:
      >>> from refax import nnx
      >>> linear = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
      >>> nnx.find_duplicates({"a": linear, "b": linear})
      [[('a',), ('b',)]]
    """
    pred = to_predicate(only)
    paths: dict[int, list[tuple]] = {}
    values: dict[int, Any] = {}
    stack: list[tuple[Any, tuple]] = [(node, ())]
    while stack:
        value, path = stack.pop()
        if is_graph_node(value):
            seen = paths.setdefault(id(value), [])
            values[id(value)] = value
            seen.append(path)
            if len(seen) > 1:
                continue
        if isinstance(value, Pytree) or _is_container(value):
            stack.extend((child, (*path, key)) for key, child in reversed(_children(value)))
    return [p for i, p in paths.items() if len(p) > 1 and (only is ... or pred(p[0], values[i]))]


# -- functional helpers ----------------------------------------------------------------------
def map(  # noqa: A001
    f: Callable[[tuple, Any], Any],
    node: A,
    /,
    *,
    graph: bool | None = None,
    recreate_variables: bool = True,
) -> A:
    """Returns a new node whose state leaves are ``f(path, leaf)`` (the leaves are the
    Variables and raw arrays; a raw value returned for a Variable is wrapped in a Variable of
    the same type unless ``recreate_variables=False``).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> zeros = nnx.map(lambda path, x: jnp.zeros_like(x), model)
      >>> type(zeros.kernel).__name__, float(zeros.kernel[...].sum())
      ('Param', 0.0)
    """
    graphdef_, st = split(node, graph=graph)
    if isinstance(st, State):
        st = st.map(f)
    else:  # a bare leaf
        st = f((), st)
    return merge(graphdef_, st, recreate_variables=recreate_variables)


def set_metadata(node: Any, *args: Any, only: Any = Variable, **metadata: Any) -> None:
    """Sets metadata on every Variable of ``node`` matching ``only``, in place."""
    pred = to_predicate(only)
    for path, value in iter_graph(node):
        if isinstance(value, Variable) and pred(path, value):
            value.set_metadata(*args, **metadata)


def as_pure(tree: Any) -> Any:
    """Replaces every Variable in ``tree`` by its raw value."""
    return jax.tree.map(
        lambda x: x.get_value() if isinstance(x, Variable) else x,
        tree,
        is_leaf=lambda x: isinstance(x, Variable),
    )


pure = as_pure


class GraphState(MutableMapping):
    """A GraphDef bundled with one State (what ``unpack`` returns).

    A mutable mapping over the State, with attribute access; a JAX pytree with the same key
    paths as the State (the GraphDef is static data); accepted by ``merge`` and ``update`` in
    place of ``(graphdef, state)``.

    Attributes:
      _graphdef: the GraphDef.
      _state: the State.
    """

    __slots__ = ("_graphdef", "_state")

    def __init__(self, graphdef: GraphDef, state: State):
        if not isinstance(state, State):
            raise ValueError(
                f"GraphState expects a State, got {type(state).__name__}: pass the State "
                "split() returned with this GraphDef."
            )
        object.__setattr__(self, "_graphdef", graphdef)
        object.__setattr__(self, "_state", state)

    @property
    def graphdef(self) -> GraphDef:
        return self._graphdef

    @property
    def state(self) -> State:
        return self._state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._state, name, value)

    def __getitem__(self, key: Any) -> Any:
        return self._state[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._state[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._state[key]

    def __contains__(self, key: object) -> bool:
        return key in self._state

    def __iter__(self):
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)

    def __repr__(self) -> str:
        return f"GraphState({self._graphdef!r}, {self._state!r})"


def _graph_state_flatten_with_keys(g: GraphState):
    m = g._state._mapping
    keys = tuple(sorted_keys(m))
    return [(jax.tree_util.DictKey(k), m[k]) for k in keys], (g._graphdef, keys)


def _graph_state_flatten(g: GraphState):
    m = g._state._mapping
    keys = tuple(sorted_keys(m))
    return [m[k] for k in keys], (g._graphdef, keys)


def _graph_state_unflatten(aux: tuple, children: Any) -> GraphState:
    graphdef_, keys = aux
    return GraphState(graphdef_, State._from_dict_unsafe(dict(zip(keys, children))))


jax.tree_util.register_pytree_with_keys(
    GraphState, _graph_state_flatten_with_keys, _graph_state_unflatten, _graph_state_flatten
)


def unpack(node: Any, *filters: Any, graph: bool | None = None) -> GraphState | tuple:
    """Like ``split``, but bundles the GraphDef with each State in a :class:`GraphState` (a
    single GraphState for zero or one filter).

    Example:
      >>> from refax import nnx
      >>> params, rest = nnx.unpack(nnx.BatchNorm(2, rngs=nnx.Rngs(0)), nnx.Param, ...)
      >>> sorted(params), sorted(rest)
      (['bias', 'scale'], ['mean', 'var'])
      >>> type(nnx.merge(params, rest)).__name__
      'BatchNorm'
    """
    graphdef_, *states = split(node, *filters, graph=graph)
    out = tuple(GraphState(graphdef_, s) for s in states)
    return out[0] if len(out) == 1 else out


# GraphDef.apply's functional calls run these (see _graphdef.API)
_graphdef.API.merge = merge
_graphdef.API.split = split


def call(graph_state: tuple[GraphDef, Any], /) -> _CallProxy:
    """Functional method calls on a ``(graphdef, state)`` pair."""
    graphdef_, *states = graph_state
    return _CallProxy(graphdef_, tuple(states))


def recursive_map(f: Callable[[tuple, Any], Any], node: Any, *, graph: bool | None = None) -> Any:
    """Rebuilds a copy of ``node`` bottom-up, replacing each node or leaf by ``f(path, value)``.

    The input is not modified (it is cloned first); shared nodes are mapped once. Raises
    ValueError on a reference cycle, which has no bottom to start from, and in tree mode
    (``graph=False``) on any shared reference.
    """
    node = clone(node, graph=graph)
    done: dict[int, Any] = {}
    active: set[int] = set()
    result: list[Any] = []
    # frames: [value, path, children iterator, mapped children (tuples only), parent frame, key]
    stack: list[list[Any]] = [[node, (), None, None, None, None]]
    while stack:
        frame = stack[-1]
        value, path, it = frame[0], frame[1], frame[2]
        if it is None:
            if is_graph_node(value):
                if id(value) in done:
                    stack.pop()
                    _put_mapped(frame, done[id(value)], result)
                    continue
                if id(value) in active:
                    raise ValueError(
                        f"recursive_map found a reference cycle at "
                        f"'{'.'.join(str(p) for p in path)}': a node that contains itself "
                        "cannot be rebuilt bottom-up."
                    )
                active.add(id(value))
            walks = isinstance(value, (Pytree, list, dict)) or type(value) is tuple
            it = frame[2] = iter(_children(value) if walks else ())
            if type(value) is tuple:
                frame[3] = []
        for key, child in it:
            stack.append([child, (*path, key), None, None, frame, key])
            break
        else:
            stack.pop()
            if frame[3] is not None:
                value = tuple(frame[3])
            out = f(path, value)
            if is_graph_node(value):
                done[id(value)] = out
                active.discard(id(value))
            _put_mapped(frame, out, result)
    return result[0]


def _put_mapped(frame: list[Any], new: Any, result: list[Any]) -> None:
    """Gives a mapped child to its parent (or to the result when it is the root)."""
    parent, key = frame[4], frame[5]
    if parent is None:
        result.append(new)
        return
    container = parent[0]
    if parent[3] is not None:  # a tuple being rebuilt
        parent[3].append(new)
    elif isinstance(container, Pytree):
        if container.__dict__.get(key) is not new:
            container.__dict__[key] = new
    else:
        container[key] = new
