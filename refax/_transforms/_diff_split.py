"""The arguments of a differentiating transform split into differentiated and other leaves
(``vjp``, ``jvp``, ``custom_vjp``), and the predicates that choose the differentiated ones."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from refax._filters import to_predicate
from refax._graph._api import map as graph_map
from refax._graph._api import state as graph_state
from refax._graph._flatten import is_graph_node
from refax._statelib import State
from refax._transforms._lift import (
    Step,
    split_inputs,
)
from refax._transforms._masks import fill, interleave
from refax._transforms._prefix import arg_owners
from refax._variables import Param, Variable

__all__: list[str] = []

PARAM = to_predicate(Param)
MISSING = object()


def everything(path: tuple, leaf: Any) -> bool:
    """Differentiates every leaf (a Variable not inside an object, or ``custom_vjp`` without
    graph updates)."""
    return True


def inexact(path: tuple, leaf: Any) -> bool:
    """Tree mode differentiates every floating-point Variable (as JAX does on a pytree)."""
    value = leaf._raw_value if isinstance(leaf, Variable) else leaf
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return isinstance(value, (float, complex))
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def arraylike(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, bool, int, float, complex))


def zero_like(x: Any) -> Any:
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.inexact):
        return jnp.zeros(jnp.shape(x), dtype)
    return np.zeros(jnp.shape(x), jax.dtypes.float0)


def as_mapping(t: Any) -> Any:
    """A tangent / cotangent given for an object: its nested dict of leaves."""
    if isinstance(t, Variable):
        return t
    if is_graph_node(t):
        t = graph_state(t)
    return t.raw_mapping if isinstance(t, State) else t


def lookup(mapping: Any, keys: tuple) -> Any:
    """The raw value at ``keys`` in a nested mapping of Variables/arrays; None when absent."""
    node = mapping
    for key in keys:
        if isinstance(node, State):
            node = node.raw_mapping
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    if isinstance(node, State):
        return None
    return node._raw_value if isinstance(node, Variable) else node


class Split:
    """The arguments of one call, split into differentiated and other leaves.

    ``value_mask``/``other_mask`` mark the differentiated state leaves and plain leaves;
    ``dv``/``do`` hold them, ``nv``/``no`` the rest (``no`` keeps its positions, with None at
    differentiated ones).
    """

    def __init__(
        self,
        args: tuple,
        preds: dict[int, Any],
        plain_diff: Callable[[int], bool],
        graph: bool | None = True,
        graph_updates: bool | None = True,
    ):
        self.args = args
        self.inputs = inputs = split_inputs(args, {}, graph=graph, graph_updates=graph_updates)
        self.owners = owners = arg_owners(inputs, args, {})
        walk = inputs.walk
        mask = []
        for leaf, path in zip(walk.leaves, walk.paths):
            pred = preds.get(owners[inputs.node_pos[path[0]]])
            mask.append(pred is not None and pred(path[1:], leaf))
        self.value_mask = tuple(mask)
        self.other_mask = tuple(
            x is not None and arraylike(x) and plain_diff(owners[i])
            for i, x in enumerate(inputs.other)
        )
        self.dv = [x for m, x in zip(self.value_mask, inputs.values) if m]
        self.nv = [x for m, x in zip(self.value_mask, inputs.values) if not m]
        self.do = [x for m, x in zip(self.other_mask, inputs.other) if m]
        self.no = [None if m else x for m, x in zip(self.other_mask, inputs.other)]
        self.call = inputs.call()
        node_at = {p: k for k, p in enumerate(inputs.node_pos)}
        self.node_at = node_at
        # per argument: (first flat position, treedef with objects as leaves)
        self.arg_layout = []
        start = 0
        for a in args:
            treedef = jax.tree_util.tree_structure(a, is_leaf=is_graph_node)
            self.arg_layout.append((start, treedef))
            start += treedef.num_leaves

    def rebuild(self, dv: Sequence[Any], do: Sequence[Any], nv=None, no=None) -> Step:
        """The inner step on the differentiated leaves ``dv``/``do`` and the others."""
        values = interleave(self.value_mask, dv, self.nv if nv is None else nv)
        other = fill(self.other_mask, do, self.no if no is None else no)
        return Step(self.call, values, other)

    def diff_leaves_of(self, k: int) -> list[tuple[int, tuple]]:
        """(index among dv, path inside the node) of the differentiated leaves of node ``k``."""
        out, j = [], 0
        for m, path in zip(self.value_mask, self.inputs.walk.paths):
            if m:
                if path[0] == k:
                    out.append((j, path[1:]))
                j += 1
        return out

    def per_arg(self, i: int, for_node: Callable[[int], Any], for_plain: Callable[[int], Any]):
        """Argument ``i``'s pytree with each object replaced by ``for_node(node index)`` and
        each other leaf by ``for_plain(flat position)``."""
        start, treedef = self.arg_layout[i]
        leaves = []
        for pos in range(start, start + treedef.num_leaves):
            k = self.node_at.get(pos)
            leaves.append(for_node(k) if k is not None else for_plain(pos))
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def state_of(self, k: int, values: Sequence[Any]) -> Any:
        """The State (a Variable for a bare Variable argument) of node ``k``'s diff leaves."""
        leaves = self.inputs.walk.leaves
        dv_index = [i for i, m in enumerate(self.value_mask) if m]
        root: dict = {}
        for j, path in self.diff_leaves_of(k):
            leaf = leaves[dv_index[j]]
            v = leaf.replace(values[j]) if isinstance(leaf, Variable) else values[j]
            if not path:
                return v
            d = root
            for key in path[:-1]:
                d = d.setdefault(key, {})
            d[path[-1]] = v
        return State._from_dict_unsafe(root)

    def cotangents(self, g_dv: Sequence[Any], g_do: Sequence[Any], argnums: Sequence[int]):
        """Per argument in ``argnums``: States for objects, gradients for other leaves."""
        plain = dict(zip([i for i, m in enumerate(self.other_mask) if m], g_do))
        return tuple(
            self.per_arg(i, lambda k: self.state_of(k, g_dv), lambda pos: plain.get(pos))
            for i in argnums
        )

    def cotangents_like_args(self, g_dv: Sequence[Any], g_do: Sequence[Any], argnums):
        """Per argument in ``argnums``: a copy of the argument whose Variables hold their
        cotangents (``float0`` zeros where not differentiated), as ``jax.vjp`` on its pytree."""
        walk = self.inputs.walk
        it = iter(g_dv)
        by_id = {id(leaf): next(it) for leaf, m in zip(walk.leaves, self.value_mask) if m}

        def swap(path: tuple, x: Any) -> Any:
            if not isinstance(x, Variable):
                return x
            g = by_id.get(id(x), MISSING)
            if g is MISSING:
                g = np.zeros(np.shape(x._raw_value), jax.dtypes.float0)
            return x.replace(g)

        plain = dict(zip([i for i, m in enumerate(self.other_mask) if m], g_do))
        return tuple(
            self.per_arg(
                i,
                lambda k: graph_map(swap, self.inputs.nodes[k]),
                lambda pos: plain.get(pos),
            )
            for i in argnums
        )

    def flat_tangents(self, i: int, t: Any, what: str) -> tuple[dict, dict]:
        """Tangents given for argument ``i``: ({dv index: value}, {flat position: value})."""
        start, treedef = self.arg_layout[i]
        if t is None:
            return {}, {}
        try:
            leaves = treedef.flatten_up_to(t)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"The {what} for argument {i} does not have the argument's structure "
                f"{treedef} (objects count as leaves and take a State): {e}"
            ) from None
        by_dv: dict[int, Any] = {}
        by_pos: dict[int, Any] = {}
        for j, leaf in enumerate(leaves):
            pos = start + j
            k = self.node_at.get(pos)
            if k is None:
                by_pos[pos] = leaf
                continue
            if leaf is None:
                continue
            mapping = as_mapping(leaf)
            for d, path in self.diff_leaves_of(k):
                if not path:
                    by_dv[d] = mapping._raw_value if isinstance(mapping, Variable) else mapping
                else:
                    by_dv[d] = lookup(mapping, path)
        return by_dv, by_pos
