"""(GraphDef, state) -> objects: the interpreter, one pass over the GraphDef's entries.

``unflatten`` reads a GraphDef's entries in order (they are in pre-order, see
``_graphdef.py``) and keeps a stack of the nodes being filled, so any depth works at Python's
default recursion limit. It takes leaves from nested state dicts by key (or, with
``flat=True``, from a flat list in walk order), reuses existing objects by node index
(``existing``: how updates made inside a transform flow back into the caller's objects), and
produces the precise error message when a State does not fit. Repeated merges of one GraphDef
go through the compiled plan in ``_plan.py`` instead, which falls back to this interpreter for
its errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from refax._graph._flatten import path_str
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
from refax._object import _STATE_ATTR, new_object_state
from refax._statelib import State
from refax._tracers import bump_epoch, current_trace
from refax._variables import Variable, _set_frozen, _set_meta, _set_raw
from refax.errors import GraphStructureError

_MISSING = object()


def as_dict(state: Any) -> Any:
    """The nested dict behind a State (dicts pass through; leaves are returned unchanged)."""
    if type(state) is dict:
        return state
    if isinstance(state, State):
        return state._mapping
    return state


def merge_dicts(dicts: Sequence[Any]) -> Any:
    """Deep-merges nested state dicts (later wins); returns the first when there is one."""
    dicts = [as_dict(d) for d in dicts]
    if len(dicts) == 1:
        return dicts[0]
    out: dict = {}
    for d in dicts:
        stack = [(out, d)]
        while stack:
            dst, src = stack.pop()
            for k, v in src.items():
                v = as_dict(v)
                if type(v) is dict:
                    sub = dst.get(k)
                    if type(sub) is not dict:
                        sub = dst[k] = {}
                    stack.append((sub, v))
                else:
                    dst[k] = v
    return out


class _Empty(dict):
    def get(self, key: Any, default: Any = None) -> Any:
        return default


_EMPTY = _Empty()


class _Frame:
    """A node whose children are being built: an Object, or a container built when done."""

    __slots__ = ("entry", "obj", "sub", "keys", "i", "out", "found")

    def __init__(self, entry: tuple, obj: Any, sub: Any, keys: tuple):
        self.entry = entry
        self.obj = obj  # the Object being filled (None for containers)
        self.sub = sub  # its nested state dict
        self.keys = keys
        self.i = 0
        self.out: list[Any] = []
        self.found = 0  # how many keys of ``sub`` were used


def unflatten(
    graphdef: GraphDef,
    state: Any,
    *,
    copy_variables: bool = False,
    existing: dict[int, Any] | None = None,
    flat: bool = False,
    nodes_out: list[Any] | None = None,
    index_ref: dict[int, Any] | None = None,
    recreate_variables: bool = True,
) -> Any:
    """Builds the graph described by ``graphdef``, taking leaves from the nested ``state`` dict.

    Args:
      graphdef: the structure.
      state: a nested dict (or State) of leaves keyed like the graph's paths; with
        ``flat=True``, a sequence of leaves in walk order (as ``flatten`` lists them).
      copy_variables: build new Variables even when the state holds Variables.
      existing: node index -> object to update in place instead of creating a new one.
      nodes_out: if given, receives the built nodes by index.
      index_ref: node numbering shared with earlier rebuilds (``merge_context``): references
        to the nodes it holds resolve to them; the nodes built are added to it.
      recreate_variables: wrap a raw value found where the GraphDef has a Variable in a new
        Variable of that type (False: place the raw value as it is).
    """
    ops = graphdef.ops
    nodes: list[Any] = [None] * graphdef.num_nodes
    if nodes_out is not None:
        nodes_out[:] = nodes
        nodes = nodes_out
    if index_ref:
        for idx, node in index_ref.items():
            if idx < len(nodes):
                nodes[idx] = node
    leaf_iter = iter(state) if flat else None
    changed = False
    trace = current_trace()
    stack: list[_Frame] = []
    result: Any = None
    for entry in ops:
        # where this entry goes: the next child of the node on top of the stack
        if stack:
            parent = stack[-1]
            key = parent.keys[parent.i]
            parent.i += 1
            if leaf_iter is None:
                sub = parent.sub.get(key, _MISSING)
                if sub is not _MISSING:
                    parent.found += 1
            else:
                sub = _MISSING
        else:
            parent = None
            sub = _MISSING if flat else state
        op = entry[0]
        if op == STATIC:
            value = entry[1]
        elif op == REF:
            value = nodes[entry[1]]
        elif op == VAR:
            if leaf_iter is not None:
                sub = next(leaf_iter)
            if sub is _MISSING:
                raise _missing(stack, f"{entry[1].__name__} Variable")
            idx = entry[2]
            target = existing.get(idx) if existing is not None else None
            if target is not None:
                if target is not sub:
                    _set_raw(target, sub._raw_value if isinstance(sub, Variable) else sub)
                    if target._var_metadata != entry[3].mapping:
                        _set_meta(target, dict(entry[3].mapping))
                        _set_frozen(target, None)
                        changed = True
                value = target
            elif isinstance(sub, Variable) and not copy_variables:
                value = sub
            elif not recreate_variables and not isinstance(sub, Variable):
                value = sub
            else:
                raw = sub._raw_value if isinstance(sub, Variable) else sub
                value = entry[1]._from_parts(raw, entry[3].mapping, entry[3])
            nodes[idx] = value
        elif op == ARR:
            if leaf_iter is not None:
                sub = next(leaf_iter)
            if sub is _MISSING:
                raise _missing(stack, "an array")
            value = sub._raw_value if isinstance(sub, Variable) else sub
        else:
            d = as_dict(sub) if sub is not _MISSING else _EMPTY
            if op == OBJ:
                idx = entry[2]
                value = existing.get(idx) if existing is not None else None
                if value is None:
                    value = object.__new__(entry[1])
                nodes[idx] = value
                frame = _Frame(entry, value, d, entry[5])
            else:
                frame = _Frame(entry, None, d, entry_keys(entry))
                if d and leaf_iter is None:
                    _check_extra(d, frame.keys, stack)
            stack.append(frame)
            value = _MISSING  # placed when the node is complete
        if value is not _MISSING:
            if parent is None:
                result = value
            else:
                parent.out.append(value)
        # close every node whose children are all built
        while stack and stack[-1].i == arity(stack[-1].entry):
            frame = stack.pop()
            if frame.obj is not None:
                value = frame.obj
                _fill_object(frame, trace, existing is not None, stack, leaf_iter)
            else:
                value = _build_container(frame)
            if stack:
                stack[-1].out.append(value)
            else:
                result = value
    if changed:
        bump_epoch()
    if index_ref is not None:
        index_ref.update((i, n) for i, n in enumerate(nodes) if n is not None)
    return result


def _fill_object(
    frame: _Frame, trace: Any, maybe_existing: bool, stack: list[_Frame], leaf_iter: Any
) -> None:
    """Sets the attributes of a completed Object (a new one, or an existing one in place)."""
    _, cls, idx, snames, svals, dnames, marks = frame.entry
    if leaf_iter is None and frame.found != len(frame.sub):
        _check_extra(frame.sub, dnames, stack)
    d = frame.obj.__dict__
    st = d.get(_STATE_ATTR) if maybe_existing else None
    if st is None:  # a new object: refax's entry goes last (see _flatten.py)
        d.update(zip(snames, svals))
        d.update(zip(dnames, frame.out))
        d[_STATE_ATTR] = new_object_state(trace, marks)
        return
    values = dict(zip(snames, svals))
    values.update(zip(dnames, frame.out))
    for name in [n for n in d if n != _STATE_ATTR and n not in values]:
        del d[name]
    for name, v in values.items():
        if d.get(name, _MISSING) is not v:
            d[name] = v


def _build_container(frame: _Frame) -> Any:
    entry, out = frame.entry, frame.out
    op = entry[0]
    if op == LIST:
        return out
    if op == TUPLE:
        return tuple(out)
    if op == DICT:
        return dict(zip(entry[1], out))
    return jax.tree_util.tree_unflatten(entry[1], out)


def _stack_path(stack: list[_Frame]) -> tuple:
    """The path of the entry being built: the keys of the children each open node is at."""
    return tuple(frame.keys[frame.i - 1] for frame in stack)


def _missing(stack: list[_Frame], what: str) -> GraphStructureError:
    return GraphStructureError(
        f"The State does not fit the GraphDef: no value for {what} at "
        f"'{path_str(_stack_path(stack))}'. Pass every State that split() returned for this "
        "GraphDef."
    )


def _check_extra(sub: Any, expected: Sequence[Any], stack: list[_Frame]) -> None:
    extra = [k for k in sub if k not in expected]
    if extra:
        path = _stack_path(stack)
        shown = ", ".join(repr(path_str((*path, k))) for k in extra[:5])
        raise GraphStructureError(
            f"The State does not fit the GraphDef: it has values at {shown} that the "
            "GraphDef does not use. Pass the States that split() returned for this GraphDef."
        )


def nest_leaves(graphdef: GraphDef, leaves: Sequence[Any], skip: Any = _MISSING) -> Any:
    """The nested state dict of a walk, filled with ``leaves`` (one per state leaf, in walk
    order): what ``flatten`` would have placed, with the given values. Leaves that are
    ``skip`` are left out, and so are levels left empty. One pass, any depth."""
    it = iter(leaves)
    result: Any = {}
    # frames: [dict being filled, child keys, next child, parent dict, key in parent]
    stack: list[list[Any]] = []
    for entry in graphdef.ops:
        frame = stack[-1] if stack else None
        if frame is not None:
            key = frame[1][frame[2]]
            frame[2] += 1
        op = entry[0]
        if op == VAR or op == ARR:
            value = next(it)
            if value is not skip:
                if frame is None:
                    result = value
                else:
                    frame[0][key] = value
        elif arity(entry) or op in (OBJ, LIST, TUPLE, DICT, TREE):
            level: dict = {}
            if frame is None:
                result = level
                stack.append([level, entry_keys(entry), 0, None, None])
            else:
                stack.append([level, entry_keys(entry), 0, frame[0], key])
        while stack and stack[-1][2] == len(stack[-1][1]):
            level, _, _, parent, key = stack.pop()
            if level and parent is not None:
                parent[key] = level
    return result
