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
from refax._object import new_object_state
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
    """Builds one Object: its attributes' order, statics and Variables at once; its other
    children (sub-Objects, containers, references) by the steps that follow."""

    __slots__ = ("cls", "idx", "template", "variables", "arrays", "n_found", "marks")

    def __init__(self, entry: tuple, child_entries: list[tuple]):
        _, self.cls, self.idx, snames, svals, dnames, self.marks = entry
        # every attribute in the interpreter's order (statics, then the rest, each sorted);
        # values not known in advance are filled in by this step or the next ones
        self.template = dict(zip(snames, svals))
        variables, arrays = [], []
        for name, c in zip(dnames, child_entries):
            op = c[0]
            self.template[name] = c[1] if op == STATIC else None
            if op == VAR:
                variables.append((name, c[1]._from_parts, c[2], c[3]))
            elif op == ARR:
                arrays.append(name)
        self.variables = tuple(variables)
        self.arrays = tuple(arrays)
        self.n_found = len(variables) + len(arrays)  # state keys this step itself consumes


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
    steps: list[tuple] = []
    for j, entry in enumerate(ops):
        if j in folded:
            continue
        op = entry[0]
        if op == OBJ:
            children = kids.get(j, [])
            step = _ObjStep(entry, [ops[c] for c in children])
            names = []
            for name, c in zip(entry[5], children):
                if ops[c][0] in (VAR, ARR, STATIC):
                    folded.add(c)
                else:
                    names.append(name)
            steps.append((_S_OBJ, step, len(names), tuple(names)))
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


class _Frame:
    """A node whose child steps are running."""

    __slots__ = ("holder", "sub", "keys", "i", "n", "found", "out", "entry", "marks")

    def __init__(self, holder: Any, sub: dict, keys: tuple, n: int, found: int = 0):
        self.holder = holder  # an Object's __dict__, a list or dict; None: built when done
        self.sub = sub  # the node's nested state dict
        self.keys = keys
        self.i = 0
        self.n = n
        self.found = found  # keys of ``sub`` used so far
        self.out: list[Any] | None = None  # children of a tuple / pytree built when done
        self.entry: tuple | None = None
        self.marks: Any = _MISSING  # an Object's marks: it gets its bookkeeping entry last


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
    stack: list[_Frame] = []
    result: Any = _MISSING
    for kind, data, n_children, keys in plan_for(graphdef):
        if stack:
            parent = stack[-1]
            key = parent.keys[parent.i]
            parent.i += 1
            sub = parent.sub.get(key, _MISSING)
            if sub is not _MISSING:
                parent.found += 1
        else:
            parent, key, sub = None, None, state
        if kind == _S_OBJ:
            obj = _new(data.cls)
            nodes[data.idx] = obj
            d = obj.__dict__
            d.update(data.template)
            s = _sub_dict(sub)
            for name, from_parts, idx, frozen in data.variables:
                leaf = s.get(name, _MISSING)
                if isinstance(leaf, Variable):
                    if copy:
                        leaf = from_parts(leaf._raw_value, frozen.mapping, frozen)
                elif leaf is _MISSING or type(leaf) is dict:
                    raise _Mismatch
                else:
                    leaf = from_parts(leaf, frozen.mapping, frozen)
                nodes[idx] = leaf
                d[name] = leaf
            for name in data.arrays:
                leaf = s.get(name, _MISSING)
                if leaf is _MISSING or type(leaf) is dict:
                    raise _Mismatch
                d[name] = leaf._raw_value if isinstance(leaf, Variable) else leaf
            value = obj
            if n_children:
                frame = _Frame(d, s, keys, n_children, data.n_found)
                frame.marks = data.marks
                stack.append(frame)
            else:
                if len(s) != data.n_found:
                    raise _Mismatch
                d[_STATE_ATTR] = new_object_state(trace, data.marks)
        elif kind == _S_REF:
            value = nodes[data]
        elif kind == _S_LEAF:
            value = _leaf(data, sub, nodes, copy)
        elif kind == _S_LIST or kind == _S_DICT:
            value = [] if kind == _S_LIST else {}
            stack.append(_Frame(value, _sub_dict(sub), keys, n_children))
        else:  # a tuple or another pytree, built once its children are
            frame = _Frame(None, _sub_dict(sub), keys, n_children)
            frame.out, frame.entry = [], data
            stack.append(frame)
            value = _MISSING
        if value is not _MISSING:
            if parent is None:
                result = value
            else:
                _place(parent, key, value)
        while stack and stack[-1].i == stack[-1].n:
            done = stack.pop()
            if done.found != len(done.sub):
                raise _Mismatch
            if done.marks is not _MISSING:  # an Object: refax's entry goes last
                done.holder[_STATE_ATTR] = new_object_state(trace, done.marks)
            elif done.out is not None:
                entry = done.entry
                if entry[0] == TUPLE:
                    value = tuple(done.out)
                else:
                    value = jax.tree_util.tree_unflatten(entry[1], done.out)
                if stack:
                    parent = stack[-1]
                    _place(parent, parent.keys[parent.i - 1], value)
                else:
                    result = value
    if result is _MISSING:  # pragma: no cover - a GraphDef always has a root
        raise _Mismatch
    return result


def _place(frame: _Frame, key: Any, value: Any) -> None:
    holder = frame.holder
    if holder is None:
        frame.out.append(value)  # type: ignore[union-attr]
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
    nodes[entry[2]] = var
    return var
