"""Stateful ``vjp`` / ``jvp`` and ``custom_vjp`` over functions that take refax objects.

Differentiation follows the conventions of ``nnx.grad``: for an argument holding objects, the
differentiated part is the objects' ``Param`` state (``custom_vjp`` also accepts a
``DiffState(argnum, filter)`` to choose another part); every other Variable (BatchStat,
RngState, counters) goes in as a non-differentiated input and its updates still propagate out.
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
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from refax._config import resolve_modes
from refax._filters import to_predicate
from refax._graph._api import map as graph_map
from refax._graph._api import state as graph_state
from refax._graph._flatten import is_graph_node
from refax._statelib import State
from refax._transforms._checks import (
    check_no_input_outputs,
    check_no_shared,
    check_not_bound_method,
    split_aux,
)
from refax._transforms._eval_shape import merge_output, split_output
from refax._transforms._lift import (
    Static,
    Step,
    apply_outputs,
    input_leaves,
    split_inputs,
)
from refax._transforms._masks import fill, interleave
from refax._transforms._prefix import DiffState, arg_owners
from refax._variables import Param, Variable

__all__ = ["vjp", "jvp", "custom_vjp", "CustomVjp"]

A = TypeVar("A")
_PARAM = to_predicate(Param)
_MISSING = object()


def _inexact(path: tuple, leaf: Any) -> bool:
    """Tree mode differentiates every floating-point Variable (as JAX does on a pytree)."""
    value = leaf._raw_value if isinstance(leaf, Variable) else leaf
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return isinstance(value, (float, complex))
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _arraylike(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, bool, int, float, complex))


def _zero_like(x: Any) -> Any:
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.inexact):
        return jnp.zeros(jnp.shape(x), dtype)
    return np.zeros(jnp.shape(x), jax.dtypes.float0)


def _as_mapping(t: Any) -> Any:
    """A tangent / cotangent given for an object: its nested dict of leaves."""
    if isinstance(t, Variable):
        return t
    if is_graph_node(t):
        t = graph_state(t)
    return t.raw_mapping if isinstance(t, State) else t


def _lookup(mapping: Any, keys: tuple) -> Any:
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


class _Split:
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
            x is not None and _arraylike(x) and plain_diff(owners[i])
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
            g = by_id.get(id(x), _MISSING)
            if g is _MISSING:
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
            mapping = _as_mapping(leaf)
            for d, path in self.diff_leaves_of(k):
                if not path:
                    by_dv[d] = mapping._raw_value if isinstance(mapping, Variable) else mapping
                else:
                    by_dv[d] = _lookup(mapping, path)
        return by_dv, by_pos


def _check_no_nodes(out: Any, transform: str) -> None:
    if any(is_graph_node(x) for x in jax.tree_util.tree_leaves(out, is_leaf=is_graph_node)):
        raise TypeError(
            f"nnx.{transform}: the differentiated output contains a refax object; it must be "
            "arrays only. Return objects as auxiliary data (has_aux=True) instead."
        )


def _pure_for(sp: _Split, f: Callable[..., Any], has_aux: bool, transform: str):
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
    pred = _PARAM if updates else _inexact
    preds = dict.fromkeys(range(len(primals)), pred)
    sp = _Split(primals, preds, lambda owner: True, graph, graph_updates)
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
    t_dv = [_zero_like(x) if t is None else t for x, t in zip(sp.dv, t_dv)]
    do_pos = [i for i, m in enumerate(sp.other_mask) if m]
    t_do = [by_pos.get(p) for p in do_pos]
    t_do = [_zero_like(x) if t is None else t for x, t in zip(sp.do, t_do)]
    out, t_out, (info, new_values, aux_other) = jax.jvp(
        _pure_for(sp, f, has_aux, "jvp"), (sp.dv, sp.do), (t_dv, t_do), has_aux=True
    )
    aux = apply_outputs(sp.inputs, info.value, new_values, aux_other)
    return (out, t_out, aux) if has_aux else (out, t_out)


# -- custom_vjp ------------------------------------------------------------------------------
class CustomVjp(Generic[A]):
    """A function with a custom VJP; made by :func:`custom_vjp`, completed by :meth:`defvjp`.

    Calling conventions in graph mode with graph updates (the default):

    * ``fwd(*args) -> (out, residuals)``, with the same arguments as the function; it usually
      calls the function itself. Residuals may hold objects (they are rebuilt for ``bwd``).
    * ``bwd(*nondiff_args, residuals, (input_updates_g, out_g)) -> cotangents``: ``out_g`` is
      the output's cotangent; ``input_updates_g`` has one entry per differentiated argument,
      a ``State`` of the differentiable Variables of each object (the cotangent flowing into
      the values the call left in them, zeros for values it did not write) and ``None`` for
      other arguments. Copy it (``jax.tree.map(lambda x: x, ...)``) to get a template for the
      cotangents.
    * ``bwd`` returns one cotangent per differentiated argument (``nondiff_argnums`` ints
      excluded): a ``State`` for an object (missing entries are zero, extra ones ignored;
      an object of the same structure is accepted too), arrays for arrays, ``None`` for zero.

    With ``graph_updates=False`` (or ``graph=False``) the arguments are handled as pytrees,
    as ``jax.custom_vjp`` would: every Variable of a differentiated argument is
    differentiated, ``nondiff_argnums`` (ints only) may hold objects, whose updates still
    propagate, an argument may not share a Variable with another one nor be returned, and
    ``bwd(*nondiff_args, residuals, out_g)`` returns cotangents shaped like the arguments
    (e.g. ``jax.tree.map(lambda x: x, module)`` with the gradients written in). If ``bwd``
    declares an ``updates_g`` parameter it also receives, per argument, a copy of the argument
    holding the cotangent of each Variable the call updated (``None`` for the others).
    """

    def __init__(
        self,
        fun: Callable[..., A],
        nondiff_argnums: Sequence[int | DiffState] = (),
        graph: bool | None = None,
        graph_updates: bool | None = None,
    ):
        check_not_bound_method(fun, "custom_vjp")
        functools.update_wrapper(self, fun)
        self.fun = fun
        self.nondiff_argnums = tuple(nondiff_argnums)
        bad = [a for a in self.nondiff_argnums if not isinstance(a, (int, DiffState))]
        if bad:
            raise TypeError(
                f"nnx.custom_vjp: nondiff_argnums entries must be ints or nnx.DiffState, got "
                f"{bad[0]!r}."
            )
        self._graph, self._updates = resolve_modes(graph, graph_updates)
        self._ints = tuple(a for a in self.nondiff_argnums if isinstance(a, int))
        self._filters = tuple(
            (a.argnum, a.filter) for a in self.nondiff_argnums if isinstance(a, DiffState)
        )
        if self._filters and not self._updates:
            raise ValueError(
                "nnx.custom_vjp: `nondiff_argnums` cannot contain `DiffState` objects with "
                "graph=False or graph_updates=False: every Variable of a differentiated "
                "argument is differentiated there. Use ints, or graph=True and "
                "graph_updates=True."
            )
        self.fwd: Callable[..., Any] | None = None
        self.bwd: Callable[..., Any] | None = None
        self._bwd_updates_g = False
        try:
            self._signature: inspect.Signature | None = inspect.signature(fun)
        except (TypeError, ValueError):
            self._signature = None

    def defvjp(
        self, fwd: Callable[..., Any], bwd: Callable[..., Any], symbolic_zeros: bool = False
    ) -> None:
        """Sets the forward and backward rules; call it before calling the function.

        Args:
          fwd: ``fwd(*args) -> (out, residuals)``, taking the same arguments as the function
            (it usually calls it). The residuals may hold objects.
          bwd: ``bwd(*nondiff_args, residuals, g) -> cotangents``, one cotangent per
            differentiated argument. In graph mode with graph updates ``g`` is
            ``(input_updates_g, out_g)``; without graph updates it is ``out_g``. See
            :class:`CustomVjp` for the exact conventions.
          symbolic_zeros: must be ``False`` (symbolic zeros are not supported).

        Returns:
          None; the rules are stored on the function.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from refax import nnx
          >>> @nnx.custom_vjp
          ... def clip_gradient(x):
          ...   return x
          >>> def fwd(x):
          ...   return x, None
          >>> def bwd(res, g):
          ...   input_updates_g, out_g = g
          ...   return (jnp.clip(out_g, -1.0, 1.0),)
          >>> clip_gradient.defvjp(fwd, bwd)
          >>> jax.grad(lambda x: 5.0 * clip_gradient(x))(2.0)
          Array(1., dtype=float32, weak_type=True)
        """
        if symbolic_zeros:
            raise NotImplementedError("nnx.custom_vjp does not support symbolic_zeros=True.")
        self.fwd, self.bwd = fwd, bwd
        try:
            self._bwd_updates_g = "updates_g" in inspect.signature(bwd).parameters
        except (TypeError, ValueError):
            self._bwd_updates_g = False

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return functools.partial(self, obj)

    def __call__(self, *args: Any, **kwargs: Any) -> A:
        if self.fwd is None or self.bwd is None:
            raise AttributeError(
                f"No VJP defined for custom_vjp function {getattr(self, '__name__', '?')}: "
                "call .defvjp(fwd, bwd) first."
            )
        if kwargs:
            if self._signature is None:
                raise TypeError("nnx.custom_vjp: pass the arguments positionally.")
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args, kwargs = bound.args, bound.kwargs
            if kwargs:
                raise TypeError("nnx.custom_vjp does not support keyword-only arguments.")
        return _CustomVjpCall(self, args).run()


def _everything(path: tuple, leaf: Any) -> bool:
    return True


def _is_float0(x: Any) -> bool:
    return getattr(x, "dtype", None) == jax.dtypes.float0


def _cotangent_for(primal: Any, ct: Any) -> Any:
    """A cotangent JAX accepts for ``primal``: ``float0`` zeros for a non-float primal."""
    if ct is None:
        return None
    if not jnp.issubdtype(jnp.result_type(primal), jnp.inexact):
        return np.zeros(jnp.shape(primal), jax.dtypes.float0)
    return ct


class _CustomVjpCall:
    """One call of a :class:`CustomVjp`: the pure functions JAX's custom_vjp sees."""

    def __init__(self, cv: CustomVjp, args: tuple):
        self.cv = cv
        self.simple = simple = not cv._updates
        n = len(args)
        self.nondiff = tuple(sorted({a % n for a in cv._ints if -n <= a < n}))
        self.diff_args = tuple(i for i in range(n) if i not in self.nondiff)
        filters = {a % n: f for a, f in cv._filters if -n <= a < n}
        if simple:
            preds = dict.fromkeys(self.diff_args, _everything)
        else:
            preds = {i: to_predicate(filters.get(i, Param)) for i in self.diff_args}
        # tree mode checks sharing itself (one error message for both modes)
        plain_diff = lambda owner: owner not in self.nondiff  # noqa: E731
        self.sp = sp = _Split(args, preds, plain_diff, True, not simple)
        if simple:
            check_no_shared(sp.inputs.walk.num_refs, "custom_vjp")
        else:
            for pos in sp.inputs.node_pos:
                if sp.owners[pos] in self.nondiff:
                    raise ValueError(
                        f"nnx.custom_vjp: nondiff_argnums marks argument {sp.owners[pos]} as "
                        "non-differentiable, but it holds a refax object; integers cannot mark "
                        "objects in graph mode with graph updates. Use nnx.DiffState(argnum, "
                        "nnx.Nothing) (or another filter) to choose which of its Variables are "
                        "differentiable, or graph_updates=False."
                    )
        # the other leaves that are not differentiated: arrays go through JAX, the rest static
        self.na_mask = tuple(x is not None and _arraylike(x) for x in sp.no)
        self.na = [x for m, x in zip(self.na_mask, sp.no) if m]
        self.no_static = [None if m else x for m, x in zip(self.na_mask, sp.no)]
        self.dv_shapes = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in sp.dv]
        self.res_layout: Any = None

    def _rebuild(self, dv, da, nv, na) -> Step:
        no = fill(self.na_mask, na, self.no_static)
        return self.sp.rebuild(dv, da, nv, no)

    def _outputs(self, step: Step, out: Any) -> tuple:
        """The primal output: (Static, output leaves, input leaves written back)."""
        if self.simple:
            check_no_input_outputs(step.nodes, out, "custom_vjp")
            info, new_values, _ = step.collect(None)
            s, out_values, out_other = split_output(out)
            mask = tuple(x is not None and _arraylike(x) for x in out_other)
            static_other = tuple(None if m else x for m, x in zip(mask, out_other))
            out_arrays = [x for m, x in zip(mask, out_other) if m]
            meta = Static((info, s.value, mask, static_other))
            return meta, (out_values, out_arrays), new_values
        leaves = input_leaves(step.nodes)
        position = {id(x): i for i, x in enumerate(leaves) if isinstance(x, Variable)}

        def annotate(joint: Any) -> list[int]:
            # the input leaf each leaf of the joint walk is (-1: new, or not a Variable)
            return [position.get(id(x), -1) for x in joint.leaves]

        info, new_values, out_other = step.collect(out, annotate=annotate)
        return Static(info), out_other, new_values

    def primal(self, dv, da, nv, na):
        step = self._rebuild(dv, da, nv, na)
        return self._outputs(step, step.run(self.cv.fun))

    def forward(self, dv, da, nv, na):
        step = self._rebuild(dv, da, nv, na)
        result = step.run(self.cv.fwd)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise ValueError(
                "nnx.custom_vjp: fwd must return a pair (output, residuals), got "
                f"{type(result).__name__}."
            )
        out, res = result
        primal_out = self._outputs(step, out)
        s, res_values, res_other = split_output(res)
        mask = tuple(x is not None and _arraylike(x) for x in res_other)
        self.res_layout = (s.value, mask, [None if m else x for m, x in zip(mask, res_other)])
        res_arrays = [x for m, x in zip(mask, res_other) if m]
        return primal_out, (res_values, res_arrays, dv, da, nv, na)

    def _updates_g_graph(self, info, g_new_values) -> tuple:
        """``input_updates_g`` of graph mode with updates: per differentiated argument holding
        objects, a State of every Variable of each object (the cotangent of the value the call
        left in it where that value comes out of the call, zeros elsewhere)."""
        sp = self.sp
        walk = sp.inputs.walk
        n = len(walk.leaves)
        upd: list[Any] = [None] * n
        pairs = zip(info.changed if info.unchanged else info.annotation, g_new_values)
        for i, g_i in pairs:
            if 0 <= i < n:
                upd[i] = g_i
        values = sp.inputs.values
        upd = [
            jnp.zeros(jnp.shape(v), jnp.result_type(v)) if u is None or _is_float0(u) else u
            for v, u in zip(values, upd)
        ]

        def state_of(k: int) -> Any:
            root: dict = {}
            for leaf, path, u in zip(walk.leaves, walk.paths, upd):
                if path[0] != k:
                    continue
                v = leaf.replace(u) if isinstance(leaf, Variable) else u
                if len(path) == 1:
                    return v
                d = root
                for key in path[1:-1]:
                    d = d.setdefault(key, {})
                d[path[-1]] = v
            return State._from_dict_unsafe(root)

        return tuple(
            sp.per_arg(i, state_of, lambda pos: None)
            if any(sp.owners[p] == i for p in sp.inputs.node_pos)
            else None
            for i in self.diff_args
        )

    def _updates_g_tree(self, info, g_new_values) -> tuple:
        """``updates_g`` without graph updates: per argument, a copy holding the cotangent of
        each updated Variable (``None`` elsewhere)."""
        sp = self.sp
        leaves = sp.inputs.walk.leaves
        by_id = {id(leaves[i]): g for i, g in zip(info.changed, g_new_values)}

        def swap(x: Any) -> Any:
            g = by_id.get(id(x), _MISSING) if isinstance(x, Variable) else _MISSING
            return None if g is _MISSING else x.replace(g)

        def for_node(k: int) -> Any:
            return jax.tree_util.tree_map(
                swap, sp.inputs.nodes[k], is_leaf=lambda x: isinstance(x, Variable)
            )

        return tuple(sp.per_arg(i, for_node, lambda pos: None) for i in range(len(sp.args)))

    def backward(self, residuals, g):
        sp = self.sp
        res_values, res_arrays, dv, da, nv, na = residuals
        structure, mask, template = self.res_layout
        res = merge_output(structure, res_values, fill(mask, res_arrays, template))
        args = self._rebuild(dv, da, nv, na).args
        nondiff_args = [args[i] for i in self.nondiff]
        bwd = self.cv.bwd
        if self.simple:
            meta, (g_out_values, g_out_arrays), g_new_values = g
            info, s, out_mask, static_other = meta.value
            out_g = merge_output(s, g_out_values, fill(out_mask, g_out_arrays, static_other))
            kwargs = {}
            if self.cv._bwd_updates_g:
                kwargs["updates_g"] = self._updates_g_tree(info, g_new_values)
            cts = bwd(*nondiff_args, res, out_g, **kwargs)  # type: ignore[misc]
        else:
            info_s, g_out_other, g_new_values = g
            info = info_s.value
            out_g = jax.tree_util.tree_unflatten(info.out_treedef, g_out_other)
            input_updates_g = self._updates_g_graph(info, g_new_values)
            cts = bwd(*nondiff_args, res, (input_updates_g, out_g))  # type: ignore[misc]
        if isinstance(cts, list):
            cts = tuple(cts)
        if not isinstance(cts, tuple) or len(cts) != len(self.diff_args):
            raise ValueError(
                "nnx.custom_vjp: bwd must return a tuple with one cotangent per differentiated "
                f"argument ({len(self.diff_args)}: arguments {list(self.diff_args)}), got "
                f"{type(cts).__name__}"
                + (f" of length {len(cts)}." if isinstance(cts, tuple) else ".")
            )
        by_dv: dict[int, Any] = {}
        by_pos: dict[int, Any] = {}
        for i, ct in zip(self.diff_args, cts):
            d, p = sp.flat_tangents(i, ct, "cotangent bwd returned")
            by_dv.update(d)
            by_pos.update(p)
        g_dv = [_cotangent_for(x, by_dv.get(j)) for j, x in enumerate(dv)]
        da_pos = [i for i, m in enumerate(sp.other_mask) if m]
        g_da = [_cotangent_for(x, by_pos.get(p)) for x, p in zip(da, da_pos)]
        return g_dv, g_da, [None] * len(nv), [None] * len(na)

    def run(self) -> Any:
        sp = self.sp
        fn = jax.custom_vjp(self.primal)
        fn.defvjp(self.forward, self.backward)
        meta, out, new_values = fn(sp.dv, sp.do, sp.nv, self.na)
        if not self.simple:
            return apply_outputs(sp.inputs, meta.value, new_values, out)
        info, s, out_mask, static_other = meta.value
        apply_outputs(sp.inputs, info, new_values, [])
        out_values, out_arrays = out
        return merge_output(s, out_values, fill(out_mask, out_arrays, static_other))


def custom_vjp(
    fun: Callable[..., A] | None = None,
    *,
    nondiff_argnums: Sequence[int | DiffState] = (),
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Lifted ``jax.custom_vjp``: a function of objects with a user-defined backward pass.

    In graph mode with graph updates (the default), the ``Param`` Variables of object
    arguments and all array arguments are differentiable; ``nondiff_argnums`` may hold ints
    (plain arguments that get no cotangent and are passed first to ``bwd``, as in JAX) and
    ``DiffState(argnum, filter)`` entries (the Variables of that object argument that are
    differentiable). The function may update Variables and change the arguments' graph
    structure (e.g. a counter attribute); both propagate out. With ``graph=False`` or
    ``graph_updates=False`` the arguments are pytrees, as in ``jax.custom_vjp``. See
    :class:`CustomVjp` for the ``fwd``/``bwd`` calling conventions of both. (The documented
    API differentiates every Variable of an object by default in graph mode too; refax uses
    ``Param``, like ``nnx.grad``.)

    Args:
      fun: the function (omit it to use ``custom_vjp(...)`` as a decorator factory).
      nondiff_argnums: ints and (graph mode with updates only) ``DiffState`` prefixes.
      graph: ``False`` selects tree mode (arguments as pytrees). ``None`` reads the default
        when ``custom_vjp`` is applied.
      graph_updates: ``False`` selects the pytree convention in graph mode too; only
        Variable values propagate out, not structural changes.

    Returns:
      A :class:`CustomVjp`; call ``.defvjp(fwd, bwd)`` before using it.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> class Foo(nnx.Module):
      ...   def __init__(self, x, y):
      ...     self.x = nnx.Param(x)
      ...     self.y = nnx.Param(y)
      >>> @nnx.custom_vjp
      ... def f(m):
      ...   return jnp.sin(m.x) * m.y
      >>> def f_fwd(m):
      ...   return f(m), (jnp.cos(m.x), jnp.sin(m.x), m)
      >>> def f_bwd(res, g):
      ...   input_updates_g, out_g = g
      ...   cos_x, sin_x, m = res
      ...   (m_g,) = jax.tree.map(lambda x: x, input_updates_g)
      ...   m_g['x'].value = cos_x * out_g * m.y
      ...   m_g['y'].value = sin_x * out_g
      ...   return (m_g,)
      >>> f.defvjp(f_fwd, f_bwd)
      >>> grads = nnx.grad(f)(Foo(jnp.array(0.0), jnp.array(2.0)))
      >>> float(grads['x'].value), float(grads['y'].value)
      (2.0, 0.0)
    """
    if fun is None:
        return lambda f: CustomVjp(f, nondiff_argnums, graph, graph_updates)
    return CustomVjp(fun, nondiff_argnums, graph, graph_updates)
