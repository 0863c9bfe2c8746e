"""Axis prefixes for the vectorising transforms: broadcasting, per-Variable resolution, and
the consistent-aliasing check.

``in_axes``/``out_axes`` are pytree prefixes of the arguments/outputs, where an object may get
an int, ``None`` or a :class:`StateAxes`. Every state leaf then gets one axis. An object reached
through several arguments (or as input and output) must get the same axis everywhere, else
``Inconsistent aliasing detected.`` lists each occurrence.

``shard_map`` uses the same machinery with PartitionSpecs in place of axes (an object takes a
``PartitionSpec``, ``None`` or a :class:`StateSharding`); the prefix kind is chosen by the
``is_leaf`` predicate (:func:`is_axis_leaf` or :func:`is_spec_leaf`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import PartitionSpec

from refax._graph._flatten import is_graph_node
from refax._statelib import State
from refax._transforms._prefix import (
    AliasChecker,
    LeafPrefix,
    ObjectPrefix,
    StateAxes,
    StateSharding,
    _CarryType,
)
from refax._variables import Variable


def is_axis_leaf(x: Any) -> bool:
    """A leaf of an axes prefix (vmap/pmap/scan): an int, None, StateAxes or Carry."""
    return x is None or isinstance(x, (int, StateAxes, _CarryType)) or _is_other_leaf_prefix(x)


def is_spec_leaf(x: Any) -> bool:
    """A leaf of a specs prefix (shard_map): a PartitionSpec, None or StateSharding."""
    return x is None or isinstance(x, (PartitionSpec, StateSharding)) or _is_other_leaf_prefix(x)


def _is_other_leaf_prefix(x: Any) -> bool:
    """A per-leaf prefix that fits any transform (``nnx.prefix``'s TreeState, ...)."""
    return isinstance(x, LeafPrefix) and not isinstance(x, (StateAxes, StateSharding))


_is_axis_leaf = is_axis_leaf

_KINDS = {
    is_axis_leaf: "an int, None or nnx.StateAxes",
    is_spec_leaf: "a PartitionSpec, None or nnx.StateSharding",
}


def broadcast_prefix(
    prefix: Any, tree: Any, what: str, is_leaf: Callable[[Any], bool] = is_axis_leaf
) -> list[Any]:
    """One prefix value per leaf of ``tree`` (objects are leaves), like JAX's axis prefixes.

    Raises:
      ValueError: when the prefix does not fit the tree, or when a ``StateAxes`` /
        ``StateSharding`` is used on something other than an object.
    """
    if is_leaf(prefix):
        leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_graph_node)
        if isinstance(prefix, LeafPrefix) and not is_graph_node(tree) and leaves:
            raise ValueError(
                f"{what}: nnx.{type(prefix).__name__} can only be used directly on an object "
                f"(Module, Variable, ...), not as the prefix of a {type(tree).__name__}. Give "
                "each object in the container its own entry."
            )
        return [prefix] * len(leaves)
    if is_graph_node(tree):
        if type(prefix) is type(tree) and not isinstance(tree, Variable):
            # an object-shaped prefix (nnx.prefix(..., graph=False)): looked up per leaf
            n = len(jax.tree_util.tree_leaves(tree, is_leaf=is_graph_node))
            return [ObjectPrefix(prefix)] * n
        raise ValueError(
            f"{what}: an object can only take {_KINDS.get(is_leaf, 'a leaf')} as its prefix, "
            f"got {type(prefix).__name__}."
        )
    if isinstance(prefix, State) and isinstance(tree, State):
        return _state_prefix(prefix, tree, what, is_leaf)
    if isinstance(prefix, (tuple, list)) and isinstance(tree, (tuple, list)):
        if len(prefix) != len(tree):
            raise ValueError(
                f"{what} has {len(prefix)} entries but the value it describes has {len(tree)}."
            )
        return [p for a, t in zip(prefix, tree) for p in broadcast_prefix(a, t, what, is_leaf)]
    if isinstance(prefix, dict) and isinstance(tree, dict):
        if set(prefix) != set(tree):
            raise ValueError(
                f"{what}: the dict prefix has keys {sorted(map(str, prefix))} but the value it "
                f"describes has keys {sorted(map(str, tree))}."
            )
        return [
            p for k in sorted(tree) for p in broadcast_prefix(prefix[k], tree[k], what, is_leaf)
        ]
    raise ValueError(
        f"{what}: cannot use a {type(prefix).__name__} as a prefix of a {type(tree).__name__}."
    )


def _state_prefix(prefix: Any, tree: Any, what: str, is_leaf: Callable[[Any], bool]) -> list:
    """One prefix value per leaf of the State ``tree`` from a State ``prefix`` keyed like it
    (a value met on the way down covers everything below it)."""
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_graph_node)[0]:
        p = prefix
        for k in path:
            if is_leaf(p) or not isinstance(p, (State, dict)):
                break
            key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", None)))
            try:
                p = p[key]
            except KeyError:
                raise ValueError(
                    f"{what}: the State prefix has no entry at "
                    f"'{jax.tree_util.keystr(path)}' of the State it describes."
                ) from None
        out.append(p)
    return out


def bind_keywords(fun: Callable[..., Any], args: tuple, kwargs: dict, prefix: Any) -> tuple:
    """Moves keyword arguments into position when a tuple ``prefix`` has entries for them.

    ``nnx.vmap(in_axes=(0, None))`` on ``def f(x, y)`` called as ``f(x, y=y)`` maps ``y`` by
    the second entry, as if it were passed positionally (JAX itself would raise). Returns
    ``(args, kwargs)``, unchanged when nothing needs moving.
    """
    if not kwargs or not isinstance(prefix, (tuple, list)) or len(prefix) <= len(args):
        return args, kwargs
    try:
        params = list(inspect.signature(fun).parameters.values())
    except (TypeError, ValueError):
        return args, kwargs
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    moved, rest = list(args), dict(kwargs)
    for param in params[len(args) : len(prefix)]:
        if param.kind not in positional or param.name not in rest:
            break
        moved.append(rest.pop(param.name))
    return tuple(moved), rest


def args_prefixes(
    in_axes: Any,
    args: tuple,
    kwargs: dict,
    *,
    is_leaf: Callable[[Any], bool] = is_axis_leaf,
    what: str = "in_axes",
    kwargs_prefix: Any = 0,
) -> list[Any]:
    """The prefix of every flat leaf of ``(args, kwargs)`` (keyword arguments use
    ``kwargs_prefix``, axis 0 like ``jax.vmap``)."""
    if isinstance(in_axes, list):
        in_axes = tuple(in_axes)
    if isinstance(in_axes, tuple):
        if len(in_axes) != len(args):
            raise ValueError(
                f"{what} has {len(in_axes)} entries but the function got {len(args)} "
                "positional arguments."
            )
        out = broadcast_prefix(in_axes, args, what, is_leaf)
    else:  # one prefix for every argument (applied to each, so a StateAxes fits objects)
        out = [p for a in args for p in broadcast_prefix(in_axes, a, what, is_leaf)]
    for k in sorted(kwargs):
        out += broadcast_prefix(kwargs_prefix, kwargs[k], what, is_leaf)
    return out


def check_input_aliasing(inputs: Any, node_prefixes: list[Any]) -> AliasChecker | None:
    """Checks every occurrence of every argument object; None when nothing can alias."""
    nodes = list(inputs.nodes)
    if inputs.walk.num_refs == 0 and len({id(n) for n in nodes}) == len(nodes):
        return None
    checker = AliasChecker()
    for node, prefix in zip(nodes, node_prefixes):
        checker.add(node, prefix)
    return checker
