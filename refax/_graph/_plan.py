"""Merge plans: a GraphDef compiled once into builders that rebuild fresh objects.

``unflatten`` interprets a GraphDef entry by entry and knows how to explain a mismatch.
Merging the same GraphDef again and again (functional training loops, ``call``, ``clone``)
deserves less work per entry. The plan compiles every subtree of at most ``_MAX_HEIGHT``
levels (a layer, a block of layers, a list of blocks) into a *builder*: a small tree of specs
with each Object's static attributes pre-built as a dict, run by a recursive function whose
depth the height bounds. Deeper structures are cut into steps that run in pre-order with an
explicit stack, so any depth works at the default recursion limit. On any mismatch the plan
gives up (``_Mismatch``) and the caller reruns the interpreter, which produces the precise
error message.
"""

from __future__ import annotations

from typing import Any

import jax

from refax._graph._graphdef import (
    ARR,
    DICT,
    LIST,
    OBJ,
    REF,
    STATIC,
    TREE,
    TUPLE,
    VAR,
    GraphDef,
    arity,
    entry_keys,
)
from refax._object import _STATE_ATTR, ObjectState, new_object_state
from refax._statelib import State
from refax._tracers import current_trace
from refax._variables import Variable

_MISSING = object()
_new = object.__new__
_MAX_HEIGHT = 12  # levels a builder covers (its recursion depth)

# builder kinds (the first field of a spec)
_B_OBJ, _B_VAR, _B_ARR, _B_STATIC, _B_REF, _B_LIST, _B_TUPLE, _B_DICT, _B_TREE = range(9)


class _Mismatch(Exception):
    """The State does not fit the plan; rerun the interpreter for a precise error."""


class _Obj:
    """How to build one Object: its class, node index (-1 when nothing refers to it), its
    attributes in the interpreter's order (statics pre-set), and a spec per other attribute."""

    __slots__ = ("cls", "idx", "template", "children", "n_keys", "marks")

    def __init__(self, entry: tuple, children: list[tuple[Any, tuple]], referenced: set[int]):
        _, self.cls, idx, snames, svals, dnames, self.marks = entry
        self.idx = idx if idx in referenced else -1
        self.template = dict(zip(snames, svals))
        self.children = tuple(children)  # set in order after the statics: the interpreter's order
        self.n_keys = sum(1 for _, s in self.children if _has_state(s))


def _has_state(spec: tuple) -> bool:
    """Whether the state dict has an entry for what ``spec`` builds (empty levels have none)."""
    kind = spec[0]
    if kind in (_B_VAR, _B_ARR):
        return True
    if kind in (_B_STATIC, _B_REF):
        return False
    return spec[-1] > 0  # containers and Objects record how many keys their level has


def _compile(ops: tuple) -> list[tuple]:
    """The steps of a GraphDef, in pre-order: ``(kind, data, keys of the children)``.

    A subtree of at most ``_MAX_HEIGHT`` levels becomes one builder step (``"build"``); the
    nodes above such subtrees are Objects (``"obj"``) and containers (``"list"``, ``"dict"``,
    ``"pytree"``) whose children are later steps.
    """
    n = len(ops)
    referenced = {entry[1] for entry in ops if entry[0] == REF}
    # the children of every entry, and the height of the subtree below it (post-order)
    kids: dict[int, list[int]] = {}
    stack: list[list[int]] = []
    for j, entry in enumerate(ops):
        if stack:
            kids[stack[-1][0]].append(j)
            stack[-1][1] -= 1
        if arity(entry):
            kids[j] = []
            stack.append([j, arity(entry)])
        while stack and stack[-1][1] == 0:
            stack.pop()
    height = [0] * n
    for j in range(n - 1, -1, -1):
        if j in kids:
            height[j] = 1 + max((height[c] for c in kids[j]), default=0)
        elif ops[j][0] in (OBJ, LIST, TUPLE, DICT, TREE):
            height[j] = 1
    specs: dict[int, tuple] = {}  # builder specs of the subtrees short enough, bottom up
    for j in range(n - 1, -1, -1):
        if height[j] <= _MAX_HEIGHT:
            specs[j] = _spec(ops, j, kids.get(j, []), specs, referenced)
    steps: list[tuple] = []
    skip_until = -1
    for j, entry in enumerate(ops):
        if j < skip_until:
            continue
        if j in specs:
            steps.append(("build", specs[j], ()))
            skip_until = _skip(ops, j)
            continue
        op = entry[0]
        keys = entry_keys(entry)
        if op == OBJ:  # (every child is a later step; statics are pre-set)
            _, cls, idx, snames, svals, dnames, marks = entry
            template = dict(zip(snames, svals))
            template.update(dict.fromkeys(dnames))
            data = (cls, idx if idx in referenced else -1, template, marks)
            steps.append(("obj", data, keys))
        elif op == LIST:
            steps.append(("list", None, keys))
        elif op == DICT:
            steps.append(("dict", None, keys))
        else:  # a tuple or another pytree, built when its children are
            steps.append(("pytree", entry, keys))
    return steps


def _spec(ops: tuple, j: int, children: list[int], specs: dict, referenced: set[int]) -> tuple:
    """The builder spec of the subtree at ``j`` (its children's specs are in ``specs``)."""
    entry = ops[j]
    op = entry[0]
    if op == VAR:
        idx = entry[2] if entry[2] in referenced else -1
        return (_B_VAR, entry[1]._from_parts, idx, entry[3])
    if op == ARR:
        return (_B_ARR,)
    if op == STATIC:
        return (_B_STATIC, entry[1])
    if op == REF:
        return (_B_REF, entry[1])
    child_specs = [specs[c] for c in children]
    n_keys = sum(1 for s in child_specs if _has_state(s))
    if op == OBJ:
        obj = _Obj(entry, list(zip(entry[5], child_specs)), referenced)
        return (_B_OBJ, obj, obj.n_keys)
    keys = entry_keys(entry)
    pairs = tuple(zip(keys, child_specs))
    if op == LIST:
        return (_B_LIST, pairs, n_keys)
    if op == TUPLE:
        return (_B_TUPLE, pairs, n_keys)
    if op == DICT:
        return (_B_DICT, pairs, n_keys)
    return (_B_TREE, pairs, entry[1], n_keys)


def _skip(ops: tuple, i: int) -> int:
    pending = 1
    while pending:
        pending += arity(ops[i]) - 1
        i += 1
    return i


def plan_for(graphdef: GraphDef) -> list[tuple]:
    """The compiled steps of ``graphdef`` (compiled on first use, then cached on it)."""
    plan = graphdef._plan
    if plan is None:
        plan = graphdef._plan = _compile(graphdef.ops)
    return plan


def _sub_dict(sub: Any) -> dict:
    if type(sub) is dict:
        return sub
    if sub is _MISSING:
        return _NO_STATE
    if isinstance(sub, State):
        return sub._mapping
    raise _Mismatch


_NO_STATE: dict = {}


class _Run:
    """What one merge needs everywhere: the nodes by index, the trace, the copy flag."""

    __slots__ = ("nodes", "trace", "copy")

    def __init__(self, num_nodes: int, copy: bool):
        self.nodes: list[Any] = [None] * num_nodes
        self.trace = current_trace()
        self.copy = copy


def _build(spec: tuple, sub: Any, run: _Run) -> Any:
    """Builds the subtree ``spec`` describes from its state ``sub`` (recursion bounded by
    ``_MAX_HEIGHT``)."""
    kind = spec[0]
    if kind == _B_OBJ:
        ob = spec[1]
        s = sub if type(sub) is dict else _sub_dict(sub)
        obj = _new(ob.cls)
        if ob.idx >= 0:
            run.nodes[ob.idx] = obj
        d = obj.__dict__
        d.update(ob.template)
        for name, child in ob.children:
            ck = child[0]
            if ck == _B_VAR:
                leaf = s.get(name, _MISSING)
                if isinstance(leaf, Variable):
                    if run.copy:
                        frozen = child[3]
                        leaf = child[1](leaf._raw_value, frozen.mapping, frozen)
                elif leaf is _MISSING or type(leaf) is dict:
                    raise _Mismatch
                else:
                    leaf = child[1](leaf, child[3].mapping, child[3])
                if child[2] >= 0:
                    run.nodes[child[2]] = leaf
                d[name] = leaf
            elif ck == _B_REF:
                d[name] = run.nodes[child[1]]
            elif ck == _B_STATIC:
                d[name] = child[1]
            else:
                d[name] = _build(child, s.get(name, _MISSING), run)
        if len(s) != ob.n_keys:
            raise _Mismatch
        st = _new(ObjectState)  # (inline: this runs once per Object)
        st.trace_state = run.trace
        st.tracked = False
        st.layout = st.snap = None
        if ob.marks is not None:
            st.static_names, st.data_names = ob.marks
        d[_STATE_ATTR] = st
        return obj
    if kind == _B_VAR:
        if sub is _MISSING or type(sub) is dict:
            raise _Mismatch
        frozen = spec[3]
        if isinstance(sub, Variable):
            var = spec[1](sub._raw_value, frozen.mapping, frozen) if run.copy else sub
        else:
            var = spec[1](sub, frozen.mapping, frozen)
        if spec[2] >= 0:
            run.nodes[spec[2]] = var
        return var
    if kind == _B_ARR:
        if sub is _MISSING or type(sub) is dict:
            raise _Mismatch
        return sub._raw_value if isinstance(sub, Variable) else sub
    if kind == _B_STATIC:
        return spec[1]
    if kind == _B_REF:
        return run.nodes[spec[1]]
    s = sub if type(sub) is dict else _sub_dict(sub)
    if len(s) != spec[-1]:
        raise _Mismatch
    items = [_build(child, s.get(key, _MISSING), run) for key, child in spec[1]]
    if kind == _B_LIST:
        return items
    if kind == _B_TUPLE:
        return tuple(items)
    if kind == _B_DICT:
        return dict(zip([key for key, _ in spec[1]], items))
    return jax.tree_util.tree_unflatten(spec[2], items)


def run_plan(graphdef: GraphDef, state: Any, copy: bool) -> Any:
    """Builds fresh objects from the nested ``state``; raises ``_Mismatch`` if it does not
    fit."""
    run = _Run(graphdef.num_nodes, copy)
    # frames: [holder (an Object's __dict__, a list or dict; None: a pytree built when done),
    #          state dict, child keys, next child, keys of the state dict used, built
    #          children (pytrees) or None, step kind, entry (pytrees) or marks (Objects)]
    stack: list[list[Any]] = []
    result: Any = _MISSING
    for kind, data, keys in plan_for(graphdef):
        if stack:
            parent = stack[-1]
            key = parent[2][parent[3]]
            parent[3] += 1
            sub = parent[1].get(key, _MISSING)
            if sub is not _MISSING:
                parent[4] += 1
        else:
            parent, key, sub = None, None, state
        if kind == "build":
            value = _build(data, sub, run)
        elif kind == "obj":
            cls, idx, template, marks = data
            obj = _new(cls)
            if idx >= 0:
                run.nodes[idx] = obj
            d = obj.__dict__
            d.update(template)
            stack.append([d, _sub_dict(sub), keys, 0, 0, None, kind, marks])
            value = obj
        elif kind == "list" or kind == "dict":
            value = [] if kind == "list" else {}
            stack.append([value, _sub_dict(sub), keys, 0, 0, None, kind, None])
        else:  # a tuple or another pytree, built once its children are
            stack.append([None, _sub_dict(sub), keys, 0, 0, [], kind, data])
            value = _MISSING
        if value is not _MISSING:
            if parent is None:
                result = value
            else:
                _place(parent, key, value)
        while stack and stack[-1][3] == len(stack[-1][2]):
            done = stack.pop()
            if done[4] != len(done[1]):
                raise _Mismatch
            if done[6] == "obj":  # refax's entry goes last
                done[0][_STATE_ATTR] = new_object_state(run.trace, done[7])
            elif done[6] == "pytree":
                entry = done[7]
                if entry[0] == TUPLE:
                    value = tuple(done[5])
                else:
                    value = jax.tree_util.tree_unflatten(entry[1], done[5])
                if stack:
                    parent = stack[-1]
                    _place(parent, parent[2][parent[3] - 1], value)
                else:
                    result = value
    if result is _MISSING:  # pragma: no cover - a GraphDef always has a root
        raise _Mismatch
    return result


def _place(frame: list[Any], key: Any, value: Any) -> None:
    holder = frame[0]
    if holder is None:
        frame[5].append(value)
    elif type(holder) is list:
        holder.append(value)
    else:
        holder[key] = value
