"""``nnx.custom_vjp``: a function with a custom backward pass over refax objects.

The primal and forward functions run on objects rebuilt by the lifting core's inner step;
``bwd`` receives the residuals and the output cotangent and returns one cotangent per
differentiated argument (a ``State`` for an object, as ``nnx.vjp`` gives). In graph mode with
updates, the cotangents of the state the call left in its arguments' objects come first
(``(input_updates_g, out_g)``); without graph updates, objects are pytrees of all their
Variables and ``bwd`` may take ``updates_g``.
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
from refax._statelib import State
from refax._transforms._checks import (
    check_no_input_outputs,
    check_no_shared,
    check_not_bound_method,
)
from refax._transforms._diff_split import (
    MISSING,
    Split,
    arraylike,
    everything,
)
from refax._transforms._eval_shape import merge_output, split_output
from refax._transforms._lift import (
    Static,
    Step,
    apply_outputs,
    input_leaves,
)
from refax._transforms._masks import fill
from refax._transforms._prefix import DiffState
from refax._variables import Param, Variable

__all__ = ["custom_vjp", "CustomVjp"]

A = TypeVar("A")


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
            preds = dict.fromkeys(self.diff_args, everything)
        else:
            preds = {i: to_predicate(filters.get(i, Param)) for i in self.diff_args}
        # tree mode checks sharing itself (one error message for both modes)
        plain_diff = lambda owner: owner not in self.nondiff  # noqa: E731
        self.sp = sp = Split(args, preds, plain_diff, True, not simple)
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
        self.na_mask = tuple(x is not None and arraylike(x) for x in sp.no)
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
            mask = tuple(x is not None and arraylike(x) for x in out_other)
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
        mask = tuple(x is not None and arraylike(x) for x in res_other)
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
            g = by_id.get(id(x), MISSING) if isinstance(x, Variable) else MISSING
            return None if g is MISSING else x.replace(g)

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
