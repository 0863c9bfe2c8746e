"""The low-level graph API: numbered flatten / unflatten and the contexts sharing a numbering.

``split`` / ``merge`` number the nodes of one graph from 0. The functions here let several
calls share one numbering, which is how a transform keeps the identity of objects across its
boundary (refax's own transforms do this with one joint walk, see ``refax/_transforms``; these
functions are the documented building blocks for writing such code by hand):

* :func:`flatten` / :func:`unflatten` take a :class:`RefMap` / :class:`IndexMap` to continue a
  numbering, and ``ref_outer_index`` / ``outer_index_outer_ref`` to record which inner node
  stands for which outer one and to update the outer objects in place.
* :func:`split_context` / :func:`merge_context` hand out a context whose ``split`` / ``merge``
  calls share one numbering: a node met again becomes a reference to the first one.
* :func:`update_context` connects the four calls around a transform (split outside, merge
  inside, split inside, merge outside), so the last one updates the original objects in place,
  structure included.

Example:
  >>> import jax
  >>> from refax import nnx
  >>> class Box(nnx.Module): pass
  >>> box = Box()
  >>> with nnx.update_context("step"):
  ...   with nnx.split_context("step") as ctx:
  ...     graphdef, state = ctx.split(box)
  ...   @jax.jit
  ...   def step(graphdef, state):
  ...     with nnx.merge_context("step", True) as ctx:
  ...       inner = ctx.merge(graphdef, state)
  ...     inner.size = 3  # a structural change inside the transform
  ...     with nnx.split_context("step") as ctx:
  ...       return ctx.split(inner)
  ...   graphdef, state = step(graphdef, state)
  ...   with nnx.merge_context("step", False) as ctx:
  ...     out = ctx.merge(graphdef, state)
  >>> out is box, box.size
  (True, 3)
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from refax._filters import to_predicate
from refax._graph._api import _check_tree_mode, _normalize_filters, _states, _tree
from refax._graph._flatten import flatten as _flatten
from refax._graph._graphdef import ARR, VAR, GraphDef
from refax._graph._refmap import IndexMap, RefMap
from refax._graph._unflatten import merge_dicts
from refax._graph._unflatten import unflatten as _unflatten
from refax._statelib import FlatState, State, from_flat_state

__all__ = [
    "flatten",
    "unflatten",
    "SplitContext",
    "MergeContext",
    "UpdateContext",
    "split_context",
    "merge_context",
    "update_context",
    "current_update_context",
]


def flatten(
    node: Any,
    /,
    *,
    with_paths: bool = True,
    ref_index: RefMap | None = None,
    ref_outer_index: RefMap | None = None,
    graph: bool | None = None,
) -> tuple[GraphDef, FlatState | list]:
    """Walks ``node`` into its GraphDef and its state leaves, numbering nodes as it goes.

    Args:
      node: an Object, a Variable, an array, or a pytree of them.
      with_paths: return a :class:`FlatState` of ``(path, leaf)`` pairs sorted by path
        (default) rather than the list of leaves in walk order.
      ref_index: a numbering shared with earlier walks: nodes it holds become references,
        new nodes are numbered after them and added to it.
      ref_outer_index: inner node -> outer index, recorded in the GraphDef
        (``GraphDef.outer``) so that ``unflatten(outer_index_outer_ref=...)`` updates the
        outer objects in place.
      graph: tree mode when False (a node met twice is an error).

    Returns:
      ``(graphdef, flat_state)``; the leaves are the graph's own Variables and arrays.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> graphdef, flat = nnx.graphlib.flatten({"w": nnx.Param(jnp.ones(2)), "n": 3})
      >>> [path for path, _ in flat]
      [('w',)]
    """
    result = _flatten(node, with_paths=with_paths, ref_index=ref_index)
    graph = _check_tree_mode(result, graph, node)
    graphdef = result.graphdef
    if ref_outer_index is not None:
        outer = tuple(ref_outer_index.get(n, -1) if n is not None else -1 for n in result.nodes)
        graphdef = GraphDef(graphdef.ops, graphdef.num_leaves, graphdef.num_nodes, outer)
    graphdef = _tree(graphdef, graph)
    if with_paths:
        return graphdef, FlatState(zip(result.paths, result.leaves))
    return graphdef, list(result.leaves)


def unflatten(
    graphdef: GraphDef,
    state: Any,
    /,
    *,
    index_ref: IndexMap | None = None,
    outer_index_outer_ref: IndexMap | None = None,
    copy_variables: bool = False,
    recreate_variables: bool = True,
) -> Any:
    """Rebuilds what ``graphdef`` describes from its leaves.

    Args:
      graphdef: the structure.
      state: a nested State (or dict), a :class:`FlatState`, or the list of leaves in walk
        order (as ``flatten(..., with_paths=False)`` returns them).
      index_ref: a numbering shared with earlier rebuilds: references to the nodes it holds
        resolve to them; the nodes built are added to it.
      outer_index_outer_ref: outer index -> outer object: the nodes the GraphDef records as
        standing for outer objects (``GraphDef.outer``) update those objects in place.
      copy_variables: build new Variables even where the state holds Variables.
      recreate_variables: wrap raw values found where the GraphDef has Variables in new
        Variables (False: place them as they are).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> graphdef, leaves = nnx.graphlib.flatten([nnx.Param(jnp.ones(2))], with_paths=False)
      >>> type(nnx.graphlib.unflatten(graphdef, leaves)[0]).__name__
      'Param'
    """
    flat = False
    if isinstance(state, FlatState):
        if graphdef.ops[0][0] in (VAR, ARR):
            state = state.leaves
            flat = True
        else:
            state = from_flat_state(state)
    elif isinstance(state, list):
        flat = True
    if flat and len(state) != graphdef.num_leaves:
        raise ValueError(
            f"Incorrect number of leaves: the GraphDef has {graphdef.num_leaves}, the state "
            f"{len(state)}. Pass the leaves flatten() returned for this GraphDef."
        )
    if not flat and graphdef.num_leaves and isinstance(state, (State, dict)) and not state:
        raise ValueError(
            f"Incorrect number of leaves: the GraphDef has {graphdef.num_leaves}, the state "
            "is empty. Pass the state flatten() or split() returned for this GraphDef."
        )
    existing = None
    if outer_index_outer_ref is not None and graphdef.outer is not None:
        existing = {
            i: outer_index_outer_ref[o]
            for i, o in enumerate(graphdef.outer)
            if o >= 0 and o in outer_index_outer_ref
        }
    return _unflatten(
        graphdef,
        state,
        copy_variables=copy_variables,
        existing=existing,
        flat=flat,
        index_ref=index_ref,
        recreate_variables=recreate_variables,
    )


# -- contexts ----------------------------------------------------------------------------------
class _Stacks(threading.local):
    """The active contexts of this thread (each thread has its own)."""

    def __init__(self) -> None:
        self.update: dict[Hashable, list[UpdateContext]] = {}


_STACKS = _Stacks()


class UpdateContext:
    """The bookkeeping connecting the four split / merge calls around a transform.

    Attributes:
      tag: the tag that names it (``update_context(tag)``).
      outer_ref_outer_index: outer object -> index, from the split outside (1).
      outer_index_outer_ref: the inverse, used by the merge outside (4).
      outer_index_inner_ref: index -> inner object, from the merge inside (2).
      inner_ref_outer_index: the inverse, used by the split inside (3).
    """

    def __init__(self, tag: Hashable):
        self.tag = tag
        self.outer_ref_outer_index: RefMap | None = None
        self.outer_index_outer_ref: IndexMap | None = None
        self.outer_index_inner_ref: IndexMap | None = None
        self.inner_ref_outer_index: RefMap | None = None

    def __repr__(self) -> str:
        return f"UpdateContext({self.tag!r})"

    def _split_end(self, ref_index: RefMap) -> None:
        if self.outer_ref_outer_index is None:  # (1): the split outside the transform
            self.outer_ref_outer_index = ref_index
            self.outer_index_outer_ref = IndexMap.from_refmap(ref_index)
        else:  # (3): inside; the inner tables are not needed any more
            self.outer_index_inner_ref = None
            self.inner_ref_outer_index = None

    def _merge_end(self, index_ref: IndexMap, inner: bool) -> None:
        if inner:  # (2): the merge inside the transform
            self.outer_index_inner_ref = index_ref
            self.inner_ref_outer_index = RefMap.from_indexmap(index_ref)


class _UpdateContextManager:
    """``update_context(tag)``: a context manager, or a decorator running a function in one."""

    def __init__(self, tag: Hashable):
        self.tag = tag

    def __enter__(self) -> UpdateContext:
        ctx = UpdateContext(self.tag)
        _STACKS.update.setdefault(self.tag, []).append(ctx)
        return ctx

    def __exit__(self, *exc: Any) -> None:
        stack = _STACKS.update[self.tag]
        stack.pop()
        if not stack:
            del _STACKS.update[self.tag]

    def __call__(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        return wrapper


def update_context(tag: Hashable) -> _UpdateContextManager:
    """Opens an :class:`UpdateContext` named ``tag`` (a context manager or a decorator).

    Inside it, ``split_context(tag)`` / ``merge_context(tag, inner)`` record how the objects
    outside a transform map to the ones inside, so the last merge (``inner=False``) updates
    the original objects in place, new attributes and references included (see the module
    docs for an example).
    """
    return _UpdateContextManager(tag)


def current_update_context(tag: Hashable) -> UpdateContext:
    """The innermost open :class:`UpdateContext` named ``tag``."""
    stack = _STACKS.update.get(tag)
    if not stack:
        raise ValueError(
            f"No update context named {tag!r} is open: wrap the calls in "
            f"`with nnx.update_context({tag!r}):`."
        )
    return stack[-1]


class SplitContext:
    """``split_context()``'s context: its ``split`` / ``flatten`` calls share one numbering."""

    def __init__(self, ctxtag: Hashable | None):
        self.ctxtag = ctxtag
        self.ref_index = RefMap()

    def _outer(self) -> RefMap | None:
        if self.ctxtag is None:
            return None
        return current_update_context(self.ctxtag).inner_ref_outer_index

    def split(self, node: Any, *filters: Any) -> tuple[Any, ...]:
        """Like :func:`refax.split`, numbering nodes after those this context met before."""
        filters = _normalize_filters(filters)
        preds = [to_predicate(f) for f in filters] if filters else None
        result = _flatten(node, preds, filters_repr=filters, ref_index=self.ref_index)
        graphdef = result.graphdef
        outer = self._outer()
        if outer is not None:
            graphdef = GraphDef(
                graphdef.ops,
                graphdef.num_leaves,
                graphdef.num_nodes,
                tuple(outer.get(n, -1) if n is not None else -1 for n in result.nodes),
            )
        return (graphdef, *_states(result, True))

    def flatten(self, node: Any, /, *, with_paths: bool = True) -> tuple[GraphDef, Any]:
        """Like :func:`flatten`, numbering nodes after those this context met before."""
        return flatten(
            node,
            with_paths=with_paths,
            ref_index=self.ref_index,
            ref_outer_index=self._outer(),
            graph=True,
        )


@contextlib.contextmanager
def split_context(ctxtag: Hashable | None = None) -> Iterator[SplitContext]:
    """A context whose ``split`` calls share one node numbering (a node met again becomes a
    reference to its first visit: ``merge_context`` then rebuilds it once)."""
    ctx = SplitContext(ctxtag)
    try:
        yield ctx
    finally:
        if ctxtag is not None:
            current_update_context(ctxtag)._split_end(ctx.ref_index)
        del ctx.ref_index
        del ctx.ctxtag


class MergeContext:
    """``merge_context()``'s context: its ``merge`` calls share one numbering."""

    def __init__(self, ctxtag: Hashable | None, inner: bool | None):
        self.ctxtag = ctxtag
        self.inner = inner
        self.index_ref = IndexMap()

    def merge(self, graphdef: GraphDef, state: Any, /, *states: Any) -> Any:
        """Like :func:`refax.merge`: references to nodes an earlier merge of this context
        built resolve to them; with an update context outside a transform (``inner=False``),
        the nodes standing for original objects update those objects in place."""
        outer = None
        if self.ctxtag is not None:
            outer = current_update_context(self.ctxtag).outer_index_outer_ref
        parts = [state, *states]
        if graphdef.ops[0][0] in (VAR, ARR):
            leaf = [p for p in parts if not (isinstance(p, (State, dict)) and not p)]
            merged = leaf[0] if leaf else parts[0]
        else:
            merged = merge_dicts(parts)
        return unflatten(graphdef, merged, index_ref=self.index_ref, outer_index_outer_ref=outer)


@contextlib.contextmanager
def merge_context(
    ctxtag: Hashable | None = None, inner: bool | None = None
) -> Iterator[MergeContext]:
    """A context whose ``merge`` calls share one node numbering (the counterpart of
    :func:`split_context`). With a ``ctxtag``, ``inner`` says whether this merge runs inside
    the transform (True) or outside it, after (False)."""
    if ctxtag is not None and inner is None:
        raise ValueError(
            "merge_context with a ctxtag needs inner=True (inside the transform) or "
            "inner=False (outside it)."
        )
    ctx = MergeContext(ctxtag, inner)
    try:
        yield ctx
    finally:
        if ctxtag is not None:
            current_update_context(ctxtag)._merge_end(ctx.index_ref, bool(inner))
        del ctx.index_ref
        del ctx.ctxtag
