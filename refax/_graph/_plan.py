"""Merge plans: a GraphDef compiled once into nested closures that rebuild fresh objects.

``unflatten`` interprets a GraphDef entry by entry, tracking paths for error messages. Merging
the same GraphDef again and again (functional training loops, ``call``) deserves better: the
plan resolves every opcode once, pre-builds each Object's static attributes as a dict, and
leaves only the dynamic work (creating objects, picking leaves out of the State) for each
call. On any mismatch the plan gives up (``_Mismatch``) and the caller reruns the interpreter,
which produces the precise error message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from refax._graph._graphdef import ARR, DICT, LIST, OBJ, REF, STATIC, TUPLE, VAR, GraphDef
from refax._object import ObjectState
from refax._statelib import State
from refax._tracers import current_trace
from refax._variables import Variable

_STATE_ATTR = "_pytree__state"
_MISSING = object()
_new = object.__new__
_fresh_state = ObjectState._fresh


class _Mismatch(Exception):
    """The State does not fit the plan; rerun the interpreter for a precise error."""


class _Ctx:
    __slots__ = ("nodes", "trace", "copy")

    def __init__(self, n: int, copy: bool):
        self.nodes: list[Any] = [None] * n
        self.trace = current_trace()
        self.copy = copy


Builder = Callable[[Any, _Ctx], Any]


def _sub_dict(sub: Any) -> dict:
    if type(sub) is dict:
        return sub
    if isinstance(sub, State):
        return sub._mapping
    raise _Mismatch


_NO_STATE: dict = {}


def _compile(enc: tuple, referenced: frozenset[int]) -> Builder:
    op = enc[0]
    if op == STATIC:
        value = enc[1]
        return lambda sub, ctx: value
    if op == REF:
        idx = enc[1]
        return lambda sub, ctx: ctx.nodes[idx]
    if op == VAR:
        cls, idx, frozen = enc[1], enc[2], enc[3]
        meta = frozen.mapping
        from_parts = cls._from_parts

        def build_var(sub: Any, ctx: _Ctx) -> Any:
            if isinstance(sub, Variable):
                var = from_parts(sub._raw_value, meta, frozen) if ctx.copy else sub
            elif sub is _MISSING or type(sub) is dict:
                raise _Mismatch
            else:
                var = from_parts(sub, meta, frozen)
            ctx.nodes[idx] = var
            return var

        return build_var
    if op == ARR:

        def build_arr(sub: Any, ctx: _Ctx) -> Any:
            if sub is _MISSING or type(sub) is dict:
                raise _Mismatch
            return sub._raw_value if isinstance(sub, Variable) else sub

        return build_arr
    if op == OBJ:
        return _compile_object(enc, referenced)
    if op in (LIST, TUPLE):
        keys, encs = tuple(range(len(enc[1]))), enc[1]
    elif op == DICT:
        keys, encs = enc[1], enc[2]
    else:
        keys, encs = enc[2], enc[3]
    children = tuple(zip(keys, [_compile(c, referenced) for c in encs]))
    dynamic = sum(1 for c in encs if c[0] not in (STATIC, REF))

    def build_children(sub: Any, ctx: _Ctx) -> list:
        d = _sub_dict(sub) if sub is not _MISSING else {}
        if len(d) > dynamic:
            raise _Mismatch
        return [f(d.get(k, _MISSING), ctx) for k, f in children]

    if op == LIST:
        return build_children
    if op == TUPLE:
        return lambda sub, ctx: tuple(build_children(sub, ctx))
    if op == DICT:
        return lambda sub, ctx: dict(zip(keys, build_children(sub, ctx)))
    treedef = enc[1]
    return lambda sub, ctx: jax.tree_util.tree_unflatten(treedef, build_children(sub, ctx))


def _referenced(enc: Any, out: set[int]) -> set[int]:
    """The node indices some REF entry points to (only those need recording while building)."""
    if type(enc) is tuple and enc:
        if enc[0] == REF and len(enc) == 2 and type(enc[1]) is int:
            out.add(enc[1])
            return out
        for item in enc:
            if type(item) is tuple:
                _referenced(item, out)
    return out


def _compile_object(enc: tuple, referenced: frozenset[int]) -> Builder:
    cls, idx, snames, svals, dyn, marks = enc[1:]
    statics = dict(zip(snames, svals))
    # Variable children are the common case: handled inline, without a call per child.
    var_children: list[tuple[str, type, int, Any]] = []
    other_children: list[tuple[str, Builder]] = []
    for name, c in dyn:
        if c[0] == VAR:
            var_children.append((name, c[1]._from_parts, c[2] in referenced, c[2], c[3]))
        else:
            other_children.append((name, _compile(c, referenced)))
    var_children_t = tuple(var_children)
    other_children_t = tuple(other_children)
    n_state_keys = sum(1 for _, c in dyn if c[0] not in (STATIC, REF))
    dnames = tuple(name for name, _ in dyn)
    dyn_template = dict.fromkeys(dnames)
    layout = (snames, svals, dnames)

    store_self = idx in referenced

    def build_obj(sub: Any, ctx: _Ctx) -> Any:
        obj = _new(cls)
        if store_self:
            ctx.nodes[idx] = obj
        d = obj.__dict__
        st = d[_STATE_ATTR] = _fresh_state(ctx.trace, statics, dyn_template, layout)
        if marks is not None:
            st.static_names, st.data_names = marks
        d.update(statics)
        if type(sub) is dict:
            s = sub
        elif sub is _MISSING:
            s = _NO_STATE
        else:
            s = _sub_dict(sub)
        if len(s) > n_state_keys:
            raise _Mismatch
        copy = ctx.copy
        for name, from_parts, store, vidx, frozen in var_children_t:
            leaf = s.get(name, _MISSING)
            if isinstance(leaf, Variable):
                if copy:
                    leaf = from_parts(leaf._raw_value, frozen.mapping, frozen)
            elif leaf is _MISSING or type(leaf) is dict:
                raise _Mismatch
            else:
                leaf = from_parts(leaf, frozen.mapping, frozen)
            if store:
                ctx.nodes[vidx] = leaf
            d[name] = leaf
        for name, f in other_children_t:
            d[name] = f(s.get(name, _MISSING), ctx)
        return obj

    return build_obj


def plan_for(graphdef: GraphDef) -> Builder:
    """The compiled builder of ``graphdef`` (compiled on first use, then cached on it)."""
    plan = graphdef._plan
    if plan is None:
        referenced = frozenset(_referenced(graphdef.root, set()))
        plan = graphdef._plan = _compile(graphdef.root, referenced)
    return plan


def run_plan(graphdef: GraphDef, state: dict, copy: bool) -> Any:
    """Builds fresh objects from ``state``; raises ``_Mismatch`` if it does not fit."""
    return plan_for(graphdef)(state, _Ctx(graphdef.num_nodes, copy))
