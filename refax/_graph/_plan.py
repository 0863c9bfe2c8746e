"""Merge plans: a GraphDef compiled once into a flat list of steps that rebuild fresh objects.

``unflatten`` interprets a GraphDef entry by entry and knows how to explain a mismatch.
Merging the same GraphDef again and again (functional training loops, ``call``, ``clone``)
deserves less work per entry: the plan resolves every opcode once, pre-builds each Object's
static attributes as a dict, and handles the Variables of an Object inside the Object's own
step, so a step runs per Object or container, not per entry. Steps run in pre-order with an
explicit stack (any depth works). On any mismatch the plan gives up (``_Mismatch``) and the
caller reruns the interpreter, which produces the precise error message.
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
from refax._object import ObjectState
from refax._object import new_object_state as _new_state
from refax._statelib import State
from refax._tracers import current_trace
from refax._variables import Variable

_STATE_ATTR = "_pytree__state"
_MISSING = object()
_new = object.__new__

# step kinds
_S_OBJ, _S_LIST, _S_DICT, _S_BUILD, _S_REF, _S_LEAF = range(6)


class _Mismatch(Exception):
    """The State does not fit the plan; rerun the interpreter for a precise error."""


class _ObjStep:
    """Builds one Object: its statics and state leaves at once, and its *simple* sub-Objects
    (those holding only Variables, arrays and statics, like most layers); its other children
    (sub-Objects, containers, references) by the steps that follow."""

    __slots__ = ("cls", "idx", "template", "leaves", "simple", "n_found", "marks")

    def __init__(self, entry: tuple, children: list[tuple[tuple, Any]], referenced: set[int]):
        """``children``: ``(entry, simple child's step or None)`` per child entry;
        ``referenced``: the node indices some reference points to (only those are recorded
        while building)."""
        _, self.cls, idx, snames, svals, dnames, self.marks = entry
        self.idx = idx if idx in referenced else -1
        # Attributes go in in the interpreter's order: statics, then the others (state leaves,
        # then walked children, each sorted), which the steps set in that order; only when
        # later steps fill some of them are all of them reserved first.
        self.template = dict(zip(snames, svals))
        leaves, simple, later = [], [], False
        for name, (c, step) in zip(dnames, children):
            op = c[0]
            if op == VAR:
                leaves.append((name, c[1]._from_parts, c[2] if c[2] in referenced else -1, c[3]))
            elif op == ARR:
                leaves.append((name, None, -2, None))
            elif op == STATIC:
                self.template[name] = c[1]
            elif step is not None:
                simple.append((name, step))
            else:
                later = True
        if later:
            self.template.update(
                (n, c[1] if c[0] == STATIC else None) for n, (c, _) in zip(dnames, children)
            )
        self.leaves = tuple(leaves)
        self.simple = tuple(simple)
        # the keys the state dict has for what this step builds (an Object without leaves
        # has no key)
        self.n_found = len(leaves) + sum(1 for _, step in simple if step.n_found)


def _compile(ops: tuple) -> list[tuple]:
    """The steps of a GraphDef, in pre-order: ``(kind, data, child step count, keys)``."""
    # the direct children of each entry, found with one pass and a stack
    kids: dict[int, list[int]] = {}
    stack: list[list[int]] = []  # [entry position, children left]
    for j, entry in enumerate(ops):
        if stack:
            kids[stack[-1][0]].append(j)
            stack[-1][1] -= 1
        if arity(entry):
            kids[j] = []
            stack.append([j, arity(entry)])
        while stack and stack[-1][1] == 0:
            stack.pop()
    folded: set[int] = set()  # entries handled by their Object's step
    referenced = {entry[1] for entry in ops if entry[0] == REF}

    def is_simple(c: int) -> bool:  # an Object whose children are all leaves or statics
        return ops[c][0] == OBJ and all(ops[g][0] in (VAR, ARR, STATIC) for g in kids.get(c, ()))

    steps: list[tuple] = []
    for j, entry in enumerate(ops):
        if j in folded:
            continue
        op = entry[0]
        if op == OBJ:
            children = kids.get(j, [])
            inner = []
            names = []
            for name, c in zip(entry[5], children):
                if ops[c][0] in (VAR, ARR, STATIC):
                    folded.add(c)
                    inner.append((ops[c], None))
                elif is_simple(c):
                    grandchildren = kids.get(c, [])
                    folded.add(c)
                    folded.update(grandchildren)
                    grand = [(ops[g], None) for g in grandchildren]
                    inner.append((ops[c], _ObjStep(ops[c], grand, referenced)))
                else:
                    inner.append((ops[c], None))
                    names.append(name)
            steps.append((_S_OBJ, _ObjStep(entry, inner, referenced), len(names), tuple(names)))
        elif op == REF:
            steps.append((_S_REF, entry[1], 0, ()))
        elif op == LIST:
            steps.append((_S_LIST, None, entry[1], entry_keys(entry)))
        elif op == DICT:
            steps.append((_S_DICT, None, len(entry[1]), entry[1]))
        elif op in (TUPLE, TREE):
            steps.append((_S_BUILD, entry, arity(entry), entry_keys(entry)))
        else:  # a Variable, array or static value inside a container
            steps.append((_S_LEAF, entry, 0, ()))
    return steps


def plan_for(graphdef: GraphDef) -> list[tuple]:
    """The compiled steps of ``graphdef`` (compiled on first use, then cached on it)."""
    plan = graphdef._plan
    if plan is None:
        plan = graphdef._plan = _compile(graphdef.ops)
    return plan


# A frame is a node whose child steps are running, as a list (cheaper than an object):
# [holder, state dict, child keys, next child, child count, keys of the state dict used,
#  built children (tuples and other pytrees, built when done) or None, entry, marks]
# holder: an Object's __dict__, or a list / dict being filled; None for a pytree built at the
# end. marks: an Object's marks (it gets its bookkeeping entry last), else _MISSING.
_HOLDER, _SUB, _KEYS, _I, _N, _FOUND, _OUT, _ENTRY, _MARKS = range(9)


def _sub_dict(sub: Any) -> dict:
    if type(sub) is dict:
        return sub
    if sub is _MISSING:
        return _NO_STATE
    if isinstance(sub, State):
        return sub._mapping
    raise _Mismatch


_NO_STATE: dict = {}


def run_plan(graphdef: GraphDef, state: Any, copy: bool) -> Any:
    """Builds fresh objects from the nested ``state``; raises ``_Mismatch`` if it does not
    fit."""
    nodes: list[Any] = [None] * graphdef.num_nodes
    trace = current_trace()
    stack: list[list[Any]] = []
    result: Any = _MISSING
    new_state = _new_state
    for kind, data, n_children, keys in plan_for(graphdef):
        if stack:
            parent = stack[-1]
            key = parent[2][parent[3]]
            parent[3] += 1
            sub = parent[1].get(key, _MISSING)
            if sub is not _MISSING:
                parent[5] += 1
        else:
            parent, key, sub = None, None, state
        if kind == _S_OBJ:
            s = _sub_dict(sub)
            value = _build_object(data, s, nodes, copy, trace)
            if n_children:
                d = value.__dict__
                stack.append([d, s, keys, 0, n_children, data.n_found, None, None, data.marks])
            else:
                if len(s) != data.n_found:
                    raise _Mismatch
                value.__dict__[_STATE_ATTR] = new_state(trace, data.marks)
        elif kind == _S_REF:
            value = nodes[data]
        elif kind == _S_LEAF:
            value = _leaf(data, sub, nodes, copy)
        elif kind == _S_LIST or kind == _S_DICT:
            value = [] if kind == _S_LIST else {}
            stack.append([value, _sub_dict(sub), keys, 0, n_children, 0, None, None, _MISSING])
        else:  # a tuple or another pytree, built once its children are
            stack.append([None, _sub_dict(sub), keys, 0, n_children, 0, [], data, _MISSING])
            value = _MISSING
        if value is not _MISSING:
            if parent is None:
                result = value
            else:
                holder = parent[0]
                if holder is None:
                    parent[6].append(value)
                elif type(holder) is list:
                    holder.append(value)
                else:
                    holder[key] = value
        while stack and stack[-1][3] == stack[-1][4]:
            done = stack.pop()
            if done[5] != len(done[1]):
                raise _Mismatch
            if done[8] is not _MISSING:  # an Object: refax's entry goes last
                done[0][_STATE_ATTR] = new_state(trace, done[8])
            elif done[6] is not None:
                entry = done[7]
                if entry[0] == TUPLE:
                    value = tuple(done[6])
                else:
                    value = jax.tree_util.tree_unflatten(entry[1], done[6])
                if stack:
                    parent = stack[-1]
                    _place(parent, parent[2][parent[3] - 1], value)
                else:
                    result = value
    if result is _MISSING:  # pragma: no cover - a GraphDef always has a root
        raise _Mismatch
    return result


def _build_object(step: _ObjStep, s: dict, nodes: list[Any], copy: bool, trace: Any) -> Any:
    """An Object with its statics, state leaves and simple sub-Objects (each complete, with
    its bookkeeping entry); the caller completes the Object itself."""
    obj = _new(step.cls)
    if step.idx >= 0:
        nodes[step.idx] = obj
    d = obj.__dict__
    d.update(step.template)
    for name, from_parts, idx, frozen in step.leaves:
        leaf = s.get(name, _MISSING)
        if leaf is _MISSING or type(leaf) is dict:
            raise _Mismatch
        if idx == -2:  # a raw array
            d[name] = leaf._raw_value if isinstance(leaf, Variable) else leaf
            continue
        if isinstance(leaf, Variable):
            if copy:
                leaf = from_parts(leaf._raw_value, frozen.mapping, frozen)
        else:
            leaf = from_parts(leaf, frozen.mapping, frozen)
        if idx >= 0:
            nodes[idx] = leaf
        d[name] = leaf
    for name, child in step.simple:
        cs = s.get(name, _NO_STATE)
        if type(cs) is not dict:
            cs = _sub_dict(cs)
        c = _build_object(child, cs, nodes, copy, trace)  # (no simple children of its own)
        if len(cs) != child.n_found:
            raise _Mismatch
        st = _new(ObjectState)
        st.trace_state = trace
        st.tracked = False
        st.layout = st.snap = None
        if child.marks is not None:
            st.static_names, st.data_names = child.marks
        c.__dict__[_STATE_ATTR] = st
        d[name] = c
    return obj


def _place(frame: list[Any], key: Any, value: Any) -> None:
    holder = frame[_HOLDER]
    if holder is None:
        frame[_OUT].append(value)
    elif type(holder) is list:
        holder.append(value)
    else:
        holder[key] = value


def _leaf(entry: tuple, sub: Any, nodes: list[Any], copy: bool) -> Any:
    op = entry[0]
    if op == STATIC:
        return entry[1]
    if sub is _MISSING or type(sub) is dict:
        raise _Mismatch
    if op == ARR:
        return sub._raw_value if isinstance(sub, Variable) else sub
    frozen = entry[3]
    if isinstance(sub, Variable):
        var = entry[1]._from_parts(sub._raw_value, frozen.mapping, frozen) if copy else sub
    else:
        var = entry[1]._from_parts(sub, frozen.mapping, frozen)
    nodes[entry[2]] = var  # (leaves in containers are rare: always recorded)
    return var
