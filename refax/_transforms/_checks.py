"""The checks every lifted transform makes, with the errors that say what to change.

Kept apart from the lifting core (``_lift.py``) so the core reads as the three steps it is;
each check is called by the core's inner step or by a transform where its rule applies.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.api_util import shaped_abstractify

from refax._graph._api import _children, find_duplicates
from refax._graph._flatten import flatten, is_graph_node
from refax._object import _STATE_ATTR, Pytree
from refax._tracers import current_trace
from refax._variables import Variable


def describe_function(fun: Callable[..., Any]) -> str:
    """``name at file:line`` of a user function (unwrapping decorators and partials)."""
    while isinstance(fun, functools.partial):
        fun = fun.func
    fun = inspect.unwrap(fun)
    name = getattr(fun, "__qualname__", None) or getattr(fun, "__name__", None) or repr(fun)
    code = getattr(fun, "__code__", None)
    if code is None:
        return name
    return f"{name} at {code.co_filename}:{code.co_firstlineno}"


def check_not_bound_method(fun: Callable[..., Any], transform: str) -> None:
    """Transforms take functions; a method bound to a Module would be captured by closure.

    Raises:
      ValueError: saying how to decorate the method or pass the module instead.
    """
    owner = getattr(fun, "__self__", None)
    if owner is not None and is_graph_node(owner):
        raise ValueError(
            f"nnx.{transform} does not take bound methods: it got a method bound to a "
            f"{type(owner).__name__} instance. The "
            "instance would be captured by closure and could not be updated. Decorate the "
            f"method in the class body (@nnx.{transform}) or pass the module as an argument: "
            f"nnx.{transform}(lambda m, *a: m.{getattr(fun, '__name__', 'method')}(*a))(module, "
            "...)."
        )


def check_output_types(fun: Callable[..., Any], out: Any, transform: str) -> None:
    """Raises TypeError naming the user's function and the output path when ``out`` holds a
    leaf that is neither a graph node nor a valid JAX type (JAX's own error would name refax's
    internal wrapper instead)."""
    leaves = jax.tree_util.tree_flatten_with_path(out, is_leaf=is_graph_node)[0]
    for path, leaf in leaves:
        if is_graph_node(leaf):
            continue
        try:
            shaped_abstractify(leaf)
        except TypeError:
            where = jax.tree_util.keystr(path) or "<the output itself>"
            raise TypeError(
                f"function {describe_function(fun)} traced for nnx.{transform} returned a "
                f"value of type {type(leaf).__name__} at output {where}, which is not a valid "
                "JAX type. Return arrays, scalars or refax objects only; keep other values out "
                "of the output (or mark an argument static)."
            ) from None


def _show_path(path: tuple) -> str:
    out = ""
    for key in path:
        out += f".{key}" if isinstance(key, str) and out else f"[{key!r}]" if out else str(key)
    return "." + out


def shared_reference_error(args: tuple, kwargs: dict) -> ValueError:
    """The error for an object or Variable reached twice through the arguments in tree mode,
    naming every path that reaches the first such value."""
    tree: dict[str, Any] = {"args": list(args)}
    if kwargs:
        tree["kwargs"] = dict(kwargs)
    # every path to every Variable (a shared object's Variables are reached through each
    # path to it), stopping at cycles
    found: dict[int, tuple[Any, list[tuple]]] = {}
    stack: list[tuple[Any, tuple, frozenset]] = [(tree, (), frozenset())]
    while stack:
        value, path, above = stack.pop()
        if isinstance(value, Variable):
            found.setdefault(id(value), (value, []))[1].append(path)
        elif id(value) not in above and isinstance(value, (Pytree, dict, list, tuple)):
            inner = above | {id(value)}
            stack += [(c, (*path, k), inner) for k, c in reversed(_children(value))]
    groups = [(v, ps) for v, ps in found.values() if len(ps) > 1]
    if not groups:
        groups = [(None, ps) for ps in find_duplicates(tree)]
    where = ""
    if groups:
        value, paths = groups[0]
        if value is None:
            value = tree
            for key in paths[0]:
                value = value[key] if isinstance(value, (dict, list, tuple)) else vars(value)[key]
        shown = "".join(f"\n  - {_show_path(p)}" for p in paths)
        where = f"Duplicate {type(value).__name__} found at paths:\n{shown}\n\n"
    return ValueError(
        f"Shared reference found in tree mode (graph=False). {where}An object or Variable "
        "reachable through more than one path in the arguments has no single place in a "
        "pytree. Pass graph=True (graph mode keeps sharing), or remove the shared reference "
        "(nnx.clone makes an independent copy)."
    )


def check_no_shared(num_refs: int, transform: str) -> None:
    """Without graph updates, an object or Variable reachable twice in the arguments is an
    error: each argument is handled as an independent pytree.

    Raises:
      ValueError: when the arguments' joint walk met ``num_refs`` > 0 repeated nodes.
    """
    if num_refs:
        raise ValueError(
            f"Duplicate object or Variable found in the arguments of nnx.{transform}: with "
            "graph=False or graph_updates=False the arguments are independent pytrees, so "
            "the same Variable cannot appear twice (duplicate inputs). Pass it once, or use "
            "graph=True and graph_updates=True."
        )


def check_no_input_returned(transform: str, input_leaves: Sequence[Any] | None, out: Any) -> None:
    """Tree mode: an input Variable returned as an output would be two pytree leaves that are
    one object afterwards, which a pytree cannot express.

    Raises:
      ValueError: naming the Variable's type and its path in the output.
    """
    if not input_leaves:
        return
    ids = {id(x) for x in input_leaves if isinstance(x, Variable)}
    leaves = jax.tree_util.tree_leaves(out, is_leaf=is_graph_node)
    out_nodes = tuple(x for x in leaves if is_graph_node(x))
    if not out_nodes or not ids:
        return
    walk = flatten(out_nodes, with_paths=True)
    for leaf, path in zip(walk.leaves, walk.paths):
        if id(leaf) in ids:
            where = ".".join(map(str, path[1:])) or "itself"
            raise ValueError(
                f"Duplicate {type(leaf).__name__}: an input Variable is returned as output "
                f"{path[0]} ({where}). nnx.{transform} without graph updates (graph=False or "
                "graph_updates=False) does not "
                "support Variable aliasing (an input Variable returned as an output, or one "
                "Variable passed twice): return its value, return a copy (nnx.clone), or pass "
                "graph=True and graph_updates=True."
            )


def check_no_input_outputs(nodes: Sequence[Any], out: Any, transform: str) -> None:
    """Without graph updates, returning an input object or Variable is an error (the output
    would alias the input).

    Raises:
      ValueError: naming the returned object's type.
    """
    ids = {id(x) for x in flatten(tuple(nodes)).nodes}
    for x in jax.tree_util.tree_leaves(out, is_leaf=is_graph_node):
        if is_graph_node(x) and id(x) in ids:
            raise ValueError(
                f"nnx.{transform} returned an input {type(x).__name__} as an output: with "
                "graph=False or graph_updates=False an output cannot alias an input Variable "
                "(input Variables returned as outputs). Return a copy (nnx.clone) or its "
                "value instead."
            )


def check_not_captured(
    transform: str, out_nodes: Sequence[Any], inputs: Sequence[Any], updates: bool
) -> None:
    """An object returned by a transformed function must be an input or made inside it; one
    captured from outside (closure) was made at another trace level.

    Raises:
      ValueError: naming the captured object's type.
    """
    known = {id(n) for n in inputs}
    fresh = tuple(n for n in out_nodes if id(n) not in known)
    if not fresh:
        return
    here = current_trace()
    walk = flatten(fresh)
    for node in [*walk.nodes, *walk.leaves]:
        if id(node) in known:
            continue
        if isinstance(node, Variable):
            trace = node._trace_state
        elif isinstance(node, Pytree):
            st = node.__dict__.get(_STATE_ATTR)
            trace = here if st is None else st.trace_state
        else:
            continue
        if trace != here:
            kind = type(node).__name__
            if updates:
                what = f"Cannot extract graph node from different trace level: a {kind}"
            else:
                what = f"Cannot return captured Variable state: a {kind}"
            raise ValueError(
                f"{what} returned by the function given to nnx.{transform} was neither an "
                "argument nor created inside the function (it was captured from an outer "
                "scope). Pass it as an argument (with its axis in the prefix) to return it."
            )


def split_aux(out: Any, has_aux: bool, transform: str) -> tuple[Any, Any]:
    """``(output, aux)`` of a function differentiated with ``has_aux`` (aux None without).

    Raises:
      ValueError: when ``has_aux`` is set and ``out`` is not a pair.
    """
    if not has_aux:
        return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            f"nnx.{transform}: has_aux=True requires the function to return a pair "
            f"(output, aux), got {type(out).__name__}."
        )
    return out
