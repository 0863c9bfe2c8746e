"""``nnx.grad`` / ``nnx.value_and_grad``: gradients with respect to objects' Variables.

``argnums`` selects arguments as in ``jax.grad``; for an argument holding objects the gradient
is taken with respect to its ``Param`` Variables (or the filter of a ``DiffState(argnum,
filter)``) and returned as a ``State`` shaped like ``nnx.state(obj, filter)``. Every other
Variable (BatchStat, RngState, counters) is passed as a non-differentiated input, never
copied, and its updates still propagate out.

Without graph updates (``graph_updates=False``, or tree mode ``graph=False``) the transform
behaves like ``jax.grad`` on the argument's pytree: every floating-point Variable of a
differentiated argument is differentiated (``DiffState`` is refused) and the gradients come
back shaped like the argument (a copy of the object whose Variables hold the gradients;
integer Variables hold ``float0`` zeros).

Example:
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> class Scale(nnx.Module):
  ...   def __init__(self):
  ...     self.w = nnx.Param(jnp.array(3.0))
  ...     self.calls = nnx.Variable(jnp.array(0))
  ...   def __call__(self, x):
  ...     self.calls += 1
  ...     return self.w * x
  >>> m = Scale()
  >>> loss, grads = nnx.value_and_grad(lambda m, x: m(x) ** 2)(m, 2.0)
  >>> float(loss), float(grads['w'].value), int(m.calls.value)
  (36.0, 24.0, 1)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from refax._config import resolve_modes
from refax._filters import to_predicate
from refax._graph._api import map as graph_map
from refax._graph._flatten import flatten, is_graph_node
from refax._graph._unflatten import nest_leaves
from refax._object import Pytree
from refax._statelib import State
from refax._transforms._checks import check_not_bound_method, split_aux
from refax._transforms._diff_split import everything, inexact
from refax._transforms._lift import Static, Step, apply_outputs, split_inputs
from refax._transforms._masks import fill, interleave
from refax._transforms._prefix import DiffState, arg_owners, check_prefix
from refax._variables import Param, Variable

__all__ = ["grad", "value_and_grad"]

_DEFAULT = object()  # the filter of a plain int argnum: Param on objects, all in containers


def _specs(argnums: int | DiffState | Sequence[int | DiffState]) -> tuple[tuple, bool]:
    """Normalises ``argnums`` to ((argnum, filter), ...) and whether a single one was given."""
    single = isinstance(argnums, (int, DiffState))
    items = (argnums,) if single else tuple(argnums)
    specs = []
    for a in items:
        if isinstance(a, DiffState):
            specs.append((a.argnum, a.filter))
        elif isinstance(a, int):
            specs.append((a, _DEFAULT))
        else:
            raise TypeError(
                f"argnums entries must be ints or nnx.DiffState, got {type(a).__name__}."
            )
    return tuple(specs), single


def _differentiate(
    fun: Callable[..., Any],
    argnums: int | DiffState | Sequence[int | DiffState],
    has_aux: bool,
    holomorphic: bool,
    allow_int: bool,
    return_value: bool,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Callable[..., Any]:
    check_not_bound_method(fun, "grad")
    check_prefix(argnums, "argnums", "grad", graph, graph_updates)
    specs, single = _specs(argnums)

    @functools.wraps(fun)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        n = len(args)
        specs_n = tuple(((a % n if a < 0 else a), f) for a, f in specs)
        for a, _ in specs_n:
            if not 0 <= a < n:
                raise ValueError(
                    f"argnums refers to argument {a} but the function got {n} arguments."
                )
        updates = resolve_modes(graph, graph_updates)[1]
        if not updates and any(isinstance(a, DiffState) for a in _items(argnums)):
            raise ValueError(
                "argnums cannot contain DiffState objects with graph=False or "
                "graph_updates=False: without graph updates every Variable of a "
                "differentiated argument is differentiated and the gradients come back shaped "
                "like the argument. Remove the DiffState, or pass graph=True and "
                "graph_updates=True (or use nnx.compat.grad)."
            )
        inputs = split_inputs(args, kwargs, graph=graph, graph_updates=graph_updates)
        owners = arg_owners(inputs, args, kwargs)
        if not updates and inputs.walk.num_refs:
            _check_consistent_aliasing(inputs, owners, {a for a, _ in specs_n})
        walk = inputs.walk
        # int argnums differentiate an object's Params, but every Variable of a plain
        # container (a State or dict of Variables), as the reference does
        preds = {a: (f if f is _DEFAULT else to_predicate(f)) for a, f in specs_n}
        params = to_predicate(Param)
        # which state leaves and which plain leaves are differentiated (and for which argnum);
        # a plain int argnum differentiates an object's Params, and a Variable that is not
        # inside an object (e.g. in a State or dict of Variables) whatever its type
        leaf_arg: list[int | None] = []
        for leaf, path in zip(walk.leaves, walk.paths):
            owner = owners[inputs.node_pos[path[0]]]
            pred = preds.get(owner)
            if pred is _DEFAULT:
                if not updates:  # like jax.grad on the argument's pytree: every float leaf
                    pred = inexact
                else:
                    pred = params if isinstance(inputs.nodes[path[0]], Pytree) else everything
            leaf_arg.append(owner if pred is not None and pred(path[1:], leaf) else None)
        other_arg = [
            owners[i] if owners[i] in preds and x is not None else None
            for i, x in enumerate(inputs.other)
        ]
        value_mask = tuple(a is not None for a in leaf_arg)
        other_mask = tuple(a is not None for a in other_arg)
        dv = [x for m, x in zip(value_mask, inputs.values) if m]
        nv = [x for m, x in zip(value_mask, inputs.values) if not m]
        do = [x for m, x in zip(other_mask, inputs.other) if m]
        no = [None if m else x for m, x in zip(other_mask, inputs.other)]
        call = inputs.call()

        def pure(dv, do, nv, no):
            step = Step(call, interleave(value_mask, dv, nv), fill(other_mask, do, no))
            value, aux = split_aux(step.run(fun), has_aux, "grad")
            info, new_values, out_other = step.collect(aux)
            return value, (Static(info), new_values, out_other)

        (value, (info, new_values, aux_other)), (g_dv, g_do) = _value_and_grad(
            pure, holomorphic, allow_int
        )(dv, do, nv, no)
        aux = apply_outputs(inputs, info.value, new_values, aux_other)
        assemble = _assemble if updates else _assemble_like_args
        grads = assemble(args, inputs, owners, specs_n, leaf_arg, value_mask, g_dv, other_arg, g_do)
        grads = grads[0] if single else tuple(grads)
        if return_value:
            return ((value, aux), grads) if has_aux else (value, grads)
        return (grads, aux) if has_aux else grads

    return wrapper


def _check_consistent_aliasing(inputs: Any, owners: list, diff: set) -> None:
    """Without graph updates, a Variable reachable from a differentiated argument and from
    another argument would be both differentiated and not: refused."""
    seen: dict[int, tuple[bool, Any, int]] = {}
    for node, pos in zip(inputs.nodes, inputs.node_pos):
        arg = owners[pos]
        for leaf in flatten(node).leaves:
            if not isinstance(leaf, Variable):
                continue
            prev = seen.setdefault(id(leaf), (arg in diff, leaf, arg))
            if prev[0] != (arg in diff):
                raise ValueError(
                    "Inconsistent aliasing detected: a "
                    f"{type(leaf).__name__} is reachable from argument {prev[2]} "
                    f"({'differentiated' if prev[0] else 'not differentiated'}) and from "
                    f"argument {arg} ({'differentiated' if arg in diff else 'not differentiated'})"
                    ". With graph_updates=False a Variable must be differentiated everywhere "
                    "or nowhere: pass it once."
                )


def _items(argnums: Any) -> tuple:
    return (argnums,) if isinstance(argnums, (int, DiffState)) else tuple(argnums)


def _value_and_grad(pure: Callable, holomorphic: bool, allow_int: bool) -> Callable:
    return jax.value_and_grad(
        pure, argnums=(0, 1), has_aux=True, holomorphic=holomorphic, allow_int=allow_int
    )


_NO_GRAD = object()  # a leaf that is not differentiated


def _assemble(
    args: tuple,
    inputs: Any,
    owners: list,
    specs: tuple,
    leaf_arg: list,
    value_mask: tuple,
    g_dv: list,
    other_arg: list,
    g_do: list,
) -> list[Any]:
    """Per argnum: the argument's pytree with objects replaced by States of their gradients."""
    walk = inputs.walk
    # gradient States per argument node (by node position among the call's nodes), nested
    # like the walk in one pass over its GraphDef (any depth)
    g_iter = iter(g_dv)
    grads = [
        (leaf.replace(next(g_iter)) if isinstance(leaf, Variable) else next(g_iter))
        if m
        else _NO_GRAD
        for leaf, m in zip(walk.leaves, value_mask)
    ]
    node_grads = nest_leaves(walk.graphdef, grads, _NO_GRAD)
    node_at = {p: k for k, p in enumerate(inputs.node_pos)}

    def node_grad(pos: int, node: Any) -> Any:
        g = node_grads.get(node_at[pos], {})
        return State._from_dict_unsafe(g) if isinstance(g, dict) else g

    return _per_argnum(args, owners, specs, other_arg, g_do, node_grad)


def _assemble_like_args(
    args: tuple,
    inputs: Any,
    owners: list,
    specs: tuple,
    leaf_arg: list,
    value_mask: tuple,
    g_dv: list,
    other_arg: list,
    g_do: list,
) -> list[Any]:
    """Per argnum: a copy of the argument whose Variables hold their gradients (the shape of
    ``jax.grad`` on the argument's pytree; used without graph updates)."""
    walk = inputs.walk
    g_iter = iter(g_dv)
    by_id = {id(leaf): next(g_iter) for leaf, m in zip(walk.leaves, value_mask) if m}

    def swap(path: tuple, x: Any) -> Any:
        g = by_id.get(id(x), _NO_GRAD)
        if g is _NO_GRAD:  # not differentiated (integer state): float0 zeros, as jax.grad
            value = x._raw_value if isinstance(x, Variable) else x
            g = np.zeros(np.shape(value), dtype=jax.dtypes.float0)
        return x.replace(g) if isinstance(x, Variable) else g

    return _per_argnum(args, owners, specs, other_arg, g_do, lambda pos, x: graph_map(swap, x))


def _per_argnum(
    args: tuple,
    owners: list,
    specs: tuple,
    other_arg: list,
    g_do: list,
    node_grad: Callable[[int, Any], Any],
) -> list[Any]:
    """Per argnum: the argument's pytree with each object replaced by ``node_grad(position,
    object)`` and each differentiated plain leaf by its gradient (None for the others)."""
    plain = dict(zip([i for i, a in enumerate(other_arg) if a is not None], g_do))
    results = []
    for argnum, _ in specs:
        leaves, treedef = jax.tree_util.tree_flatten(args[argnum], is_leaf=is_graph_node)
        start = owners.index(argnum) if argnum in owners else 0
        out = [
            node_grad(start + j, x) if is_graph_node(x) else plain.get(start + j)
            for j, x in enumerate(leaves)
        ]
        results.append(jax.tree_util.tree_unflatten(treedef, out))
    return results


def value_and_grad(
    f: Callable[..., Any] | None = None,
    argnums: int | DiffState | Sequence[int | DiffState] = 0,
    has_aux: bool = False,
    *,
    holomorphic: bool = False,
    allow_int: bool = False,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Lifted ``jax.value_and_grad``: ``(value, grads)``, or ``((value, aux), grads)``.

    Works like :func:`grad` but also returns the function's value, computed in the same pass.
    Object arguments are differentiated with respect to their Variables (``Param`` s by
    default), and every update the function makes to the arguments' objects (new Variable
    values, and structural changes in graph mode) propagates back to the caller's objects.

    Args:
      f: the function; omit it to use ``nnx.value_and_grad(...)`` as a decorator.
      argnums: which arguments to differentiate: an int, a :class:`DiffState` (argument plus
        a filter of its Variables), or a sequence of them.
      has_aux: ``f`` returns ``(value, aux)``; aux may hold objects.
      holomorphic, allow_int: as for ``jax.value_and_grad``.
      graph: ``False`` selects tree mode: objects are handled as pytrees and a shared
        reference among the arguments is an error. None reads ``nnx.set_graph_mode``.
      graph_updates: ``False`` propagates only Variable values, not structural changes, and
        differentiates as ``jax.value_and_grad`` on the argument's pytree. None reads
        ``nnx.set_graph_updates``.

    Returns:
      A function returning ``(value, grads)``, or ``((value, aux), grads)`` with ``has_aux``;
      ``grads`` is shaped as for :func:`grad`.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> loss, grads = nnx.value_and_grad(lambda m: m(jnp.ones((1, 2))).sum())(model)
      >>> grads["kernel"].value.tolist(), grads["bias"].value.tolist()
      ([[1.0], [1.0]], [1.0])
    """
    if f is None:
        return lambda fn: value_and_grad(
            fn,
            argnums,
            has_aux,
            holomorphic=holomorphic,
            allow_int=allow_int,
            graph=graph,
            graph_updates=graph_updates,
        )
    return _differentiate(
        f,
        argnums,
        has_aux,
        holomorphic,
        allow_int,
        return_value=True,
        graph=graph,
        graph_updates=graph_updates,
    )


def grad(
    f: Callable[..., Any] | None = None,
    argnums: int | DiffState | Sequence[int | DiffState] = 0,
    has_aux: bool = False,
    *,
    holomorphic: bool = False,
    allow_int: bool = False,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Lifted ``jax.grad``: gradients with respect to objects' Variables.

    Args:
      f: the function; omit it to use ``nnx.grad(...)`` as a decorator.
      argnums: which arguments to differentiate: an int, a :class:`DiffState` (argument plus
        a filter of its Variables), or a sequence of them. An object argument differentiates
        its ``Param`` s unless a ``DiffState`` says otherwise.
      has_aux: ``f`` returns ``(value, aux)``; aux may hold objects.
      holomorphic, allow_int: as for ``jax.grad``.
      graph, graph_updates: with both on (the defaults) gradients come back as a ``State``
        per object argument and every update made inside propagates; without graph updates
        the transform is ``jax.grad`` on the argument's pytree (see the module docs).

    Returns:
      The gradient function: the gradients (a tuple of them for a sequence ``argnums``),
      and ``aux`` too with ``has_aux``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> grads = nnx.grad(lambda m, x: m(x).sum())(model, jnp.ones((3, 2)))
      >>> grads["kernel"].value.tolist(), grads["bias"].value.tolist()
      ([[3.0], [3.0]], [3.0])
    """
    if f is None:
        return lambda fn: grad(
            fn,
            argnums,
            has_aux,
            holomorphic=holomorphic,
            allow_int=allow_int,
            graph=graph,
            graph_updates=graph_updates,
        )
    return _differentiate(
        f,
        argnums,
        has_aux,
        holomorphic,
        allow_int,
        return_value=False,
        graph=graph,
        graph_updates=graph_updates,
    )
