"""Axis prefixes for the vectorising transforms: broadcasting, per-Variable resolution, and
the consistent-aliasing check.

``in_axes``/``out_axes`` are pytree prefixes of the arguments/outputs, where an object may get
an int, ``None`` or a :class:`StateAxes`. Every state leaf then gets one axis. An object reached
through several arguments (or as input and output) must get the same axis everywhere, else
``Inconsistent aliasing detected.`` lists each occurrence.
"""

from __future__ import annotations

from typing import Any

import jax

from refax._graph._flatten import flatten
from refax._transforms._lift import is_node
from refax._transforms._prefix import StateAxes, _CarryType
from refax._variables import Variable


def _is_axis_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (int, StateAxes, _CarryType))


def broadcast_prefix(prefix: Any, tree: Any, what: str) -> list[Any]:
    """One prefix value per leaf of ``tree`` (objects are leaves), like JAX's axis prefixes."""
    if _is_axis_leaf(prefix):
        return [prefix] * len(jax.tree_util.tree_leaves(tree, is_leaf=is_node))
    if is_node(tree):
        raise ValueError(
            f"{what}: an object can only take an int, None or nnx.StateAxes as its prefix, got "
            f"{type(prefix).__name__}."
        )
    if isinstance(prefix, (tuple, list)) and isinstance(tree, (tuple, list)):
        if len(prefix) != len(tree):
            raise ValueError(
                f"{what} has {len(prefix)} entries but the value it describes has {len(tree)}."
            )
        return [p for a, t in zip(prefix, tree) for p in broadcast_prefix(a, t, what)]
    if isinstance(prefix, dict) and isinstance(tree, dict):
        return [p for k in sorted(tree) for p in broadcast_prefix(prefix[k], tree[k], what)]
    raise ValueError(
        f"{what}: cannot use a {type(prefix).__name__} as a prefix of a {type(tree).__name__}."
    )


def args_prefixes(in_axes: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The prefix of every flat leaf of ``(args, kwargs)`` (keyword arguments use axis 0)."""
    if isinstance(in_axes, list):
        in_axes = tuple(in_axes)
    if isinstance(in_axes, tuple) and not isinstance(in_axes, StateAxes):
        if len(in_axes) != len(args):
            raise ValueError(
                f"in_axes has {len(in_axes)} entries but the function got {len(args)} "
                "positional arguments."
            )
        out = broadcast_prefix(in_axes, args, "in_axes")
    else:
        out = broadcast_prefix(in_axes, args, "in_axes")
    for k in sorted(kwargs):
        out += broadcast_prefix(0, kwargs[k], "in_axes")
    return out


def leaf_axis(prefix: Any, path: tuple, leaf: Any) -> Any:
    """The axis of one state leaf of an object whose prefix is ``prefix``."""
    if isinstance(prefix, StateAxes):
        return prefix.lookup(path, leaf)
    return prefix


class AliasChecker:
    """Records, per Variable, the axis each occurrence of its object gives it."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[Variable, list[tuple[str, Any]]]] = {}

    def add(self, node: Any, prefix: Any) -> None:
        """Adds one occurrence of ``node`` with ``prefix``; raises on an inconsistency."""
        walk = flatten(node, with_paths=True) if not isinstance(node, Variable) else None
        items = (
            [(p, leaf) for p, leaf in zip(walk.paths, walk.leaves)]
            if walk is not None
            else [((), node)]
        )
        for path, leaf in items:
            if not isinstance(leaf, Variable):
                continue
            axis = leaf_axis(prefix, path, leaf)
            entry = self.entries.setdefault(id(leaf), (leaf, []))
            entry[1].append((".".join(map(str, path)), axis))
        self.check()

    def check(self) -> None:
        bad = [
            (leaf, items)
            for leaf, items in self.entries.values()
            if len({_axis_key(a) for _, a in items}) > 1
        ]
        if bad:
            lines = ["Inconsistent aliasing detected. The following nodes have different prefixes:"]
            for leaf, items in bad:
                lines.append(f"Node: {type(leaf).__name__}")
                lines += [f"  {path}: {axis}" for path, axis in items]
            raise ValueError("\n".join(lines))


def _axis_key(a: Any) -> Any:
    return ("carry",) if isinstance(a, _CarryType) else a


def check_input_aliasing(inputs: Any, node_prefixes: list[Any]) -> AliasChecker | None:
    """Checks every occurrence of every argument object; None when nothing can alias."""
    nodes = list(inputs.nodes)
    if inputs.walk.num_refs == 0 and len({id(n) for n in nodes}) == len(nodes):
        return None
    checker = AliasChecker()
    for node, prefix in zip(nodes, node_prefixes):
        checker.add(node, prefix)
    return checker
