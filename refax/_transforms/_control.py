"""Lifted control flow: ``cond``, ``switch``, ``while_loop`` and ``fori_loop`` over objects.

The operands (``cond``/``switch``) and the loop carry (``while_loop``/``fori_loop``) may hold
Modules, Rngs and Variables anywhere. Their state goes through the JAX primitive as a flat list
of arrays; inside, fresh objects are rebuilt from it, the user function runs, and every
Variable update comes back out and is written into the caller's objects. Returned objects that
were inputs keep their identity.

JAX requires some structure to be invariant, and so does refax:

* every branch of ``cond``/``switch`` returns the same output structure and leaves the graph
  structure of the operands the same (all branches may add the same attribute, but not one of
  them only);
* a loop body returns the carry with the pytree structure it received, holding the same
  objects, whose graph structure it does not change.

Breaking either raises :class:`refax.errors.TransformStructureError` (a ``ValueError`` and a
``TypeError``) that says which rule was broken. Mutating an object captured by closure (not
passed as an operand or in the carry) raises ``TraceContextError``.

Example:
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> class Counter(nnx.Module):
  ...   def __init__(self):
  ...     self.count = nnx.BatchStat(jnp.array(0))
  >>> def up(c, x):
  ...   c.count += 1
  ...   return x + 1
  >>> def down(c, x):
  ...   c.count -= 1
  ...   return x - 1
  >>> c = Counter()
  >>> nnx.cond(True, up, down, c, 10.0)
  Array(11., dtype=float32, weak_type=True)
  >>> int(c.count.value)
  1
  >>> def body(i, carry):
  ...   c, total = carry
  ...   c.count += 1
  ...   return c, total + i
  >>> c2, total = nnx.fori_loop(0, 4, body, (c, 0))
  >>> c2 is c, int(c.count.value), int(total)
  (True, 5, 6)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax

from refax._graph._flatten import is_graph_node
from refax._transforms._checks import check_not_bound_method
from refax._transforms._lift import Call, Info, Inputs, Static, Step, apply_outputs, split_inputs
from refax.errors import TransformStructureError

__all__ = ["cond", "switch", "while_loop", "fori_loop"]

A = TypeVar("A")
T = TypeVar("T")


def _fun_name(f: Callable[..., Any]) -> str:
    return getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or repr(f)


def _full_values(info: Info, values: Sequence[Any], new_values: Sequence[Any]) -> list[Any]:
    """Every input leaf after the function ran (``new_values`` holds the changed ones only)."""
    full = list(values)
    for i, v in zip(info.changed, new_values):
        full[i] = v
    return full


def _input_node_refs(inputs: Inputs, args: tuple, kwargs: dict) -> tuple[int, ...]:
    """The walk index of each argument node, in argument order."""
    leaves = jax.tree_util.tree_leaves((args, kwargs), is_leaf=is_graph_node)
    index = {id(n): i for i, n in enumerate(inputs.walk.nodes)}
    return tuple(index[id(leaves[p])] for p in inputs.node_pos)


# -- cond / switch ---------------------------------------------------------------------------
def _describe_mismatch(a: Info, b: Info, ka: int, kb: int) -> str:
    if a.out_treedef != b.out_treedef:
        return f"they return different output structures:\n  {a.out_treedef}\n  {b.out_treedef}"
    if a.out_pos != b.out_pos or a.out_refs != b.out_refs:
        return "they return different objects (or the same objects at different positions)"
    if a.unchanged != b.unchanged:
        changer, other = (kb, ka) if a.unchanged else (ka, kb)
        return (
            f"branch {changer} changes the graph structure of the operands (adds, deletes or "
            f"re-shares attributes, or returns new objects) and branch {other} does not"
        )
    return "they change the graph structure of the operands differently"


def _branch_pure(
    fun: Callable[..., Any], k: int, call: Call, traces: list[tuple[int, Info]]
) -> Callable[..., Any]:
    """The pure function of branch ``k``: returns every operand leaf, so that all branches
    produce the same output structure whichever leaves they changed."""

    def pure(values: list[Any], other: list[Any]) -> tuple[Static, list[Any], list[Any]]:
        step = Step(call, values, other)
        info, new_values, out_other = step.collect(step.run(fun))
        traces.append((k, info))
        if info.unchanged:
            new_values = _full_values(info, values, new_values)
            info = info.with_changed(())
        return Static(info), new_values, out_other

    return pure


def _check_branches(
    traces: list[tuple[int, Info]], branches: Sequence[Callable[..., Any]], transform: str
) -> None:
    """Raises a clear error if two traced branches disagree on structure."""
    if not traces:
        return
    k0, first = traces[0]
    for k, info in traces[1:]:
        if info.unchanged and first.unchanged:
            same = (info.out_treedef, info.out_pos, info.out_refs) == (
                first.out_treedef,
                first.out_pos,
                first.out_refs,
            )
        else:
            same = info == first
        if not same:
            why = _describe_mismatch(first, info, k0, k)
            raise TransformStructureError(
                f"nnx.{transform}: branches {k0} ({_fun_name(branches[k0])}) and {k} "
                f"({_fun_name(branches[k])}) disagree: {why}. Every branch must return the same "
                "output structure and leave the operands' graph structure the same; create "
                f"attributes before the nnx.{transform}, or identically in every branch."
            )


def _select(
    transform: str,
    run: Callable[[list[Callable[..., Any]], list[Any], list[Any]], Any],
    branches: Sequence[Callable[..., Any]],
    operands: tuple,
    graph: bool | None,
    graph_updates: bool | None,
) -> Any:
    for b in branches:
        check_not_bound_method(b, transform)
    inputs = split_inputs(operands, {}, graph=graph, graph_updates=graph_updates)
    call = inputs.call()
    traces: list[tuple[int, Info]] = []
    pures = [_branch_pure(b, k, call, traces) for k, b in enumerate(branches)]
    try:
        info_s, values, out_other = run(pures, inputs.values, inputs.other)
    except TypeError:
        _check_branches(traces, branches, transform)
        raise
    _check_branches(traces, branches, transform)
    info: Info = info_s.value
    if info.unchanged:
        # write back only the leaves some branch changed (the others come out as they went in)
        changed = tuple(sorted({i for _, t in traces for i in t.changed}))
        info = info.with_changed(changed)
        values = [values[i] for i in changed]
    return apply_outputs(inputs, info, values, out_other)


def cond(
    pred: Any,
    true_fun: Callable[..., A],
    false_fun: Callable[..., A],
    *operands: Any,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> A:
    """Lifted ``jax.lax.cond``: ``true_fun(*operands)`` if ``pred`` else ``false_fun(*operands)``.

    The operands may hold objects. The branch that runs gets them rebuilt, and the updates it
    makes (new Variable values, and structural changes that every branch makes alike)
    propagate back to the caller's objects. Both branches are traced, so they must return the
    same output structure and leave the operands' graph structure the same.

    Args:
      pred: a boolean scalar.
      true_fun: called when ``pred`` is true.
      false_fun: called when ``pred`` is false; must return the same structure as
        ``true_fun`` and leave the operands' graph structure the same.
      *operands: passed to the chosen branch; may contain objects, whose state updates
        propagate out.
      graph: ``False`` (tree mode) refuses operands that share an object or Variable.
      graph_updates: ``False`` propagates only Variable values (structure changes that
        every branch makes identically propagate otherwise).

    Returns:
      The chosen branch's output; objects that were operands keep their identity.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> v = nnx.Variable(jnp.array(1.0))
      >>> def double(v):
      ...   v.value = 2 * v.value
      >>> nnx.cond(jnp.array(False), double, lambda v: None, v)
      >>> float(v.value)
      1.0
      >>> nnx.cond(jnp.array(True), double, lambda v: None, v)
      >>> float(v.value)
      2.0
    """
    return _select(
        "cond",
        lambda fs, values, other: jax.lax.cond(pred, fs[0], fs[1], values, other),
        (true_fun, false_fun),
        operands,
        graph,
        graph_updates,
    )


def switch(
    index: Any,
    branches: Sequence[Callable[..., A]],
    *operands: Any,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> A:
    """Lifted ``jax.lax.switch``: ``branches[index](*operands)`` (``index`` clamped).

    The operands may hold objects. The branch that runs gets them rebuilt, and the updates it
    makes (new Variable values, and structural changes that every branch makes alike)
    propagate back to the caller's objects. Every branch is traced, so they must all return
    the same output structure and leave the operands' graph structure the same. An ``index``
    out of range selects the first or the last branch.

    Args:
      index: an integer scalar selecting the branch.
      branches: the functions to choose from; they must return the same structure and leave
        the operands' graph structure the same.
      *operands: passed to the chosen branch; may contain objects.
      graph: ``False`` (tree mode) refuses operands that share an object or Variable.
      graph_updates: ``False`` propagates only Variable values.

    Returns:
      The chosen branch's output; objects that were operands keep their identity.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> v = nnx.Variable(jnp.array(3.0))
      >>> def scale(k):
      ...   def f(v):
      ...     v.value = k * v.value
      ...     return v
      ...   return f
      >>> out = nnx.switch(2, [scale(0.0), scale(1.0), scale(10.0)], v)
      >>> out is v, float(v.value)
      (True, 30.0)
    """
    branches = tuple(branches)
    if not branches:
        raise ValueError("nnx.switch needs at least one branch.")
    return _select(
        "switch",
        lambda fs, values, other: jax.lax.switch(index, fs, values, other),
        branches,
        operands,
        graph,
        graph_updates,
    )


# -- while_loop / fori_loop ------------------------------------------------------------------
def _structure(x: Any) -> Any:
    return jax.tree_util.tree_structure(x, is_leaf=is_graph_node)


def _carry_path(init_val: Any, leaf: int) -> str:
    flat, _ = jax.tree_util.tree_flatten_with_path(init_val, is_leaf=is_graph_node)
    return "init_val" + jax.tree_util.keystr(flat[leaf][0]) if leaf < len(flat) else "init_val"


def _loop_call(inputs: Inputs) -> Call:
    """A loop's carry keeps its structure in every mode, so the loop functions' changes are
    always collected in full (and a structural change is an error), whatever graph_updates."""
    return dataclasses.replace(inputs.call(), graph_updates=True)


def _loop_body(
    transform: str,
    fun: Callable[..., Any],
    inputs: Inputs,
    init_val: Any,
    record: set[int],
    with_index: bool,
) -> Callable[..., Any]:
    call = _loop_call(inputs)

    def body(*a: Any) -> tuple[list[Any], list[Any]]:
        i, (values, other) = (a[0], a[1]) if with_index else (None, a[0])
        step = Step(call, values, other)
        carry, nodes = step.args[0], step.nodes
        out = fun(i, carry) if with_index else fun(carry)
        wrapped = ((out,), {})
        leaves, treedef = jax.tree_util.tree_flatten(wrapped, is_leaf=is_graph_node)
        if treedef != inputs.treedef:
            raise TransformStructureError(
                f"nnx.{transform}: body_fun must return the carry with the structure it "
                f"received.\n  received: {_structure(init_val)}"
                f"\n  returned: {_structure(out)}\n(objects "
                "count as leaves). Return the same tuple/dict layout every iteration."
            )
        for p, n in zip(inputs.node_pos, nodes):
            if leaves[p] is not n:
                raise TransformStructureError(
                    f"nnx.{transform}: body_fun returned a different object "
                    f"({type(leaves[p]).__name__}) at {_carry_path(init_val, p)} than the "
                    f"{type(n).__name__} it received there; objects in the carry must be "
                    "returned as they are (update them in place instead of creating new ones)."
                )
        info, new_values, out_other = step.collect(wrapped)
        if not info.unchanged:
            raise TransformStructureError(
                f"nnx.{transform}: body_fun changed the graph structure of the objects in the "
                "carry (an attribute was added, deleted or re-shared). The carry's structure "
                "must be the same on every iteration: create the attributes before the loop."
            )
        record.update(info.changed)
        return _full_values(info, values, new_values), out_other

    return body


def _finish_loop(
    inputs: Inputs, init_val: Any, record: set[int], values: list[Any], other: list[Any]
) -> Any:
    changed = tuple(sorted(record))
    refs = _input_node_refs(inputs, (init_val,), {})
    info = Info.same_structure(changed, inputs.treedef, inputs.node_pos, refs)
    (result,), _ = apply_outputs(inputs, info, [values[i] for i in changed], other)
    return result


def while_loop(
    cond_fun: Callable[[T], Any],
    body_fun: Callable[[T], T],
    init_val: T,
    *,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> T:
    """Lifted ``jax.lax.while_loop``: the carry may contain objects.

    Args:
      cond_fun: ``carry -> bool`` scalar; it must not update any state (its updates would be
        lost; a ``ValueError`` says so).
      body_fun: ``carry -> carry``; returns the carry with the same pytree structure and the
        same objects, updated in place as needed.
      init_val: the initial carry.
      graph: ``False`` (tree mode) refuses a carry that shares an object or Variable.
      graph_updates: accepted for API compatibility: the carry's structure is fixed in
        every mode (replacing a Variable or adding an attribute in the body is an error).

    Returns:
      The final carry; its objects are the ones in ``init_val``, holding the final state.

    Example:
      >>> import jax
      >>> from refax import nnx
      >>> rngs = nnx.Rngs(0)
      >>> def body(carry):
      ...   rngs, i, total = carry
      ...   return rngs, i + 1, total + jax.random.uniform(rngs())
      >>> _, n, total = nnx.while_loop(lambda c: c[1] < 3, body, (rngs, 0, 0.0))
      >>> int(n), int(rngs.default.count.value)
      (3, 3)
    """
    check_not_bound_method(cond_fun, "while_loop")
    check_not_bound_method(body_fun, "while_loop")
    inputs = split_inputs((init_val,), {}, graph=graph, graph_updates=graph_updates)
    call = _loop_call(inputs)
    record: set[int] = set()

    def cond(carry: tuple[list[Any], list[Any]]) -> Any:
        step = Step(call, *carry)
        pred = cond_fun(step.args[0])
        info, _, _ = step.collect(None)
        if not info.unchanged or info.changed:
            raise ValueError(
                f"nnx.while_loop: cond_fun ({_fun_name(cond_fun)}) updated the state of an "
                "object in the carry; those updates would be lost. Move them into body_fun."
            )
        return pred

    body = _loop_body("while_loop", body_fun, inputs, init_val, record, with_index=False)
    values, other = jax.lax.while_loop(cond, body, (inputs.values, inputs.other))
    return _finish_loop(inputs, init_val, record, values, other)


def fori_loop(
    lower: int | jax.Array,
    upper: int | jax.Array,
    body_fun: Callable[[Any, T], T],
    init_val: T,
    *,
    unroll: int | bool | None = None,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> T:
    """Lifted ``jax.lax.fori_loop``: ``body_fun(i, carry)`` for ``i`` in ``[lower, upper)``.

    Args:
      lower: the first index (inclusive).
      upper: the end index (exclusive).
      body_fun: ``(i, carry) -> carry``; returns the carry with the same pytree structure and
        the same objects, updated in place as needed.
      init_val: the initial carry; may contain objects.
      unroll: passed to ``jax.lax.fori_loop`` (static bounds only).
      graph: ``False`` (tree mode) refuses a carry that shares an object or Variable.
      graph_updates: accepted for API compatibility: the carry's structure is fixed in
        every mode (replacing a Variable or adding an attribute in the body is an error).

    Returns:
      The final carry; its objects are the ones in ``init_val``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      >>> def body(i, carry):
      ...   m, x = carry
      ...   m.kernel.value = jnp.eye(2) * i
      ...   return m, m(x)
      >>> m, y = nnx.fori_loop(2, 4, body, (lin, jnp.ones(2)))
      >>> y
      Array([6., 6.], dtype=float32)
    """
    check_not_bound_method(body_fun, "fori_loop")
    inputs = split_inputs((init_val,), {}, graph=graph, graph_updates=graph_updates)
    record: set[int] = set()
    body = _loop_body("fori_loop", body_fun, inputs, init_val, record, with_index=True)
    kwargs = {} if unroll is None else {"unroll": unroll}
    values, other = jax.lax.fori_loop(lower, upper, body, (inputs.values, inputs.other), **kwargs)
    return _finish_loop(inputs, init_val, record, values, other)
