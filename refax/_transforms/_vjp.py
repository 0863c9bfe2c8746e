"""Stateful ``vjp`` / ``jvp`` over functions that take refax objects.

Differentiation follows the conventions of ``nnx.grad``: for an argument holding objects, the
differentiated part is the objects' ``Param`` state (``custom_vjp`` also accepts a
``DiffState(argnum, filter)`` to choose another part, see ``_custom_vjp.py``); every other
Variable (BatchStat, RngState, counters) goes in as a non-differentiated input and its updates
still propagate out.
Tangents and cotangents for objects are ``State`` objects shaped like
``nnx.state(obj, nnx.Param)``; for arrays they are arrays, as in JAX.

With ``graph=False`` or ``graph_updates=False`` (the only modes of the documented API)
a Module is a pytree of all its Variables: every floating-point Variable is differentiated and
cotangents come back shaped like the primals. refax also works in graph mode with updates
(which the documented API refuses): there it differentiates ``Param`` state only and returns
``State`` cotangents (``jvp`` tangents may be a ``State`` or an object of the primal's type,
e.g. ``jax.tree.map(jnp.zeros_like, module)``).

Example:
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  >>> x = jnp.ones((1, 2))
  >>> out, vjp_fn = nnx.vjp(lambda m, x: m(x).sum(), lin, x)
  >>> m_grad, x_grad = vjp_fn(jnp.ones_like(out))
  >>> m_grad['kernel'].value.shape, x_grad.shape
  ((2, 3), (1, 2))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax

from refax._config import resolve_modes
from refax._graph._flatten import is_graph_node
from refax._transforms._checks import (
    check_no_input_outputs,
    check_no_shared,
    check_not_bound_method,
    split_aux,
)
from refax._transforms._diff_split import (
    PARAM,
    Split,
    inexact,
    zero_like,
)
from refax._transforms._lift import (
    Static,
    apply_outputs,
)

__all__ = ["vjp", "jvp"]


def _check_no_nodes(out: Any, transform: str) -> None:
    if any(is_graph_node(x) for x in jax.tree_util.tree_leaves(out, is_leaf=is_graph_node)):
        raise TypeError(
            f"nnx.{transform}: the differentiated output contains a refax object; it must be "
            "arrays only. Return objects as auxiliary data (has_aux=True) instead."
        )


def _pure_for(sp: Split, f: Callable[..., Any], has_aux: bool, transform: str):
    def pure(dv: list[Any], do: list[Any]) -> tuple[Any, tuple]:
        step = sp.rebuild(dv, do)
        out, aux = split_aux(step.run(f), has_aux, transform)
        _check_no_nodes(out, transform)
        if not step.call.graph_updates:
            check_no_input_outputs(step.nodes, aux, transform)
        info, new_values, aux_other = step.collect(aux)
        return out, (Static(info), new_values, aux_other)

    return pure


def _split_primals(primals: tuple, graph: bool | None, graph_updates: bool | None, what: str):
    """The split of vjp/jvp primals: ``Param`` state in graph mode with updates, every
    floating-point Variable (gradients shaped like the argument) otherwise."""
    updates = resolve_modes(graph, graph_updates)[1]
    pred = PARAM if updates else inexact
    preds = dict.fromkeys(range(len(primals)), pred)
    sp = Split(primals, preds, lambda owner: True, graph, graph_updates)
    if not updates:
        check_no_shared(sp.inputs.walk.num_refs, what)
    return sp, updates


# -- vjp / jvp -------------------------------------------------------------------------------
def vjp(
    f: Callable[..., Any] | None = None,
    *primals: Any,
    has_aux: bool = False,
    reduce_axes: Sequence[Any] = (),
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Stateful ``jax.vjp``: ``(out, vjp_fn)`` (``(out, vjp_fn, aux)`` with ``has_aux``).

    Runs ``f(*primals)`` once and returns its output with a function that pulls an output
    cotangent back to one cotangent per primal. For an object primal, the differentiated
    part is its ``Param`` state (every floating-point Variable without graph updates);
    its other Variables are plain inputs. Every update ``f`` makes to the primals' objects
    (new Variable values, and in graph mode structural changes) propagates back to them.

    Args:
      f: the function; its arguments may hold objects. Its (primary) output must be arrays.
      *primals: the arguments. Omit them (``nnx.vjp(f)``, or ``@nnx.vjp(has_aux=...)``) to get
        a function of the primals.
      has_aux: ``f`` returns ``(out, aux)``; ``aux`` may hold objects.
      reduce_axes: deprecated in JAX; must be empty.
      graph: ``False`` selects tree mode: the primals are pytrees (no sharing allowed),
        every floating-point Variable is differentiated and the cotangents come back shaped
        like the primals (objects whose Variables hold the cotangents).
      graph_updates: ``False`` selects the same pytree convention in graph mode; only
        Variable values propagate out, not structural changes.

    Returns:
      ``vjp_fn(cotangent)`` returns one cotangent per primal: a ``State`` of ``Param``
      gradients for an object, an array for an array. State updates made by ``f`` propagate
      to the primals' objects when ``vjp`` is called.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> out, vjp_fn = nnx.vjp(lambda m, x: m(x).sum(), model, jnp.ones((3, 2)))
      >>> m_grad, x_grad = vjp_fn(jnp.array(1.0))
      >>> m_grad['kernel'].value.tolist(), m_grad['bias'].value.tolist(), x_grad.shape
      ([[3.0], [3.0]], [3.0], (3, 2))
    """
    if reduce_axes:
        raise NotImplementedError("reduce_axes is deprecated in jax.vjp and not supported.")
    if f is None:
        return functools.partial(vjp, has_aux=has_aux, graph=graph, graph_updates=graph_updates)
    check_not_bound_method(f, "vjp")
    if not primals:
        return functools.partial(vjp, f, has_aux=has_aux, graph=graph, graph_updates=graph_updates)
    sp, updates = _split_primals(primals, graph, graph_updates, "vjp")
    out, raw_vjp, (info, new_values, aux_other) = jax.vjp(
        _pure_for(sp, f, has_aux, "vjp"), sp.dv, sp.do, has_aux=True
    )
    aux = apply_outputs(sp.inputs, info.value, new_values, aux_other)

    def vjp_fn(cotangent: Any) -> tuple[Any, ...]:
        g_dv, g_do = raw_vjp(cotangent)
        if not updates:
            return sp.cotangents_like_args(g_dv, g_do, range(len(primals)))
        return sp.cotangents(g_dv, g_do, range(len(primals)))

    return (out, vjp_fn, aux) if has_aux else (out, vjp_fn)


def jvp(
    f: Callable[..., Any] | None = None,
    primals: tuple[Any, ...] | None = None,
    tangents: tuple[Any, ...] | None = None,
    *,
    has_aux: bool = False,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Stateful ``jax.jvp``: ``(out, tangent_out)`` (``(out, tangent_out, aux)``).

    Runs ``f(*primals)`` once and pushes the ``tangents`` forward to the output's tangent.
    For an object primal, the part that takes a tangent is its ``Param`` state (every
    floating-point Variable without graph updates). Every update ``f`` makes to the
    primals' objects (new Variable values, and in graph mode structural changes) propagates
    back to them.

    Args:
      f: the function; its arguments may hold objects. Its (primary) output must be arrays.
      primals: the arguments, as a tuple (omit with ``tangents`` to get a function of both).
      tangents: a tuple like ``primals``: for an object, a ``State`` of ``Param`` tangents
        (missing entries count as zero) or an object of the same structure; for an array, an
        array; ``None`` anywhere means zero.
      has_aux: ``f`` returns ``(out, aux)``; ``aux`` may hold objects.
      graph: ``False`` selects tree mode: the primals are pytrees (no sharing allowed) and
        every floating-point Variable takes a tangent.
      graph_updates: ``False`` selects the same pytree convention in graph mode; only
        Variable values propagate out, not structural changes.

    Returns:
      The output and its tangent; state updates made by ``f`` propagate to the primals.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> w = nnx.Param(jnp.array(3.0))
      >>> nnx.jvp(lambda w, x: w * x, (w, 2.0), (nnx.Param(jnp.array(1.0)), 0.0))
      (Array(6., dtype=float32, weak_type=True), Array(2., dtype=float32, weak_type=True))
    """
    if f is None:
        return functools.partial(jvp, has_aux=has_aux, graph=graph, graph_updates=graph_updates)
    check_not_bound_method(f, "jvp")
    if primals is None or tangents is None:
        return functools.partial(jvp, f, has_aux=has_aux, graph=graph, graph_updates=graph_updates)
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError(
            f"nnx.jvp: got {len(primals)} primals but {len(tangents)} tangents; pass one "
            "tangent per primal (None for zero)."
        )
    sp, updates = _split_primals(primals, graph, graph_updates, "jvp")
    by_dv: dict[int, Any] = {}
    by_pos: dict[int, Any] = {}
    for i, t in enumerate(tangents):
        d, p = sp.flat_tangents(i, t, "tangent")
        by_dv.update(d)
        by_pos.update(p)
    t_dv = [by_dv.get(j) for j in range(len(sp.dv))]
    t_dv = [zero_like(x) if t is None else t for x, t in zip(sp.dv, t_dv)]
    do_pos = [i for i, m in enumerate(sp.other_mask) if m]
    t_do = [by_pos.get(p) for p in do_pos]
    t_do = [zero_like(x) if t is None else t for x, t in zip(sp.do, t_do)]
    out, t_out, (info, new_values, aux_other) = jax.jvp(
        _pure_for(sp, f, has_aux, "jvp"), (sp.dv, sp.do), (t_dv, t_do), has_aux=True
    )
    aux = apply_outputs(sp.inputs, info.value, new_values, aux_other)
    return (out, t_out, aux) if has_aux else (out, t_out)
