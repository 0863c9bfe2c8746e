"""Lifted ``remat``, ``eval_shape``, ``checkify``, ``make_jaxpr``, and partial application.

Each wraps the JAX transform of the same name around the pure function built by the lifting
core (``_lift.py``): objects may appear anywhere in the arguments and outputs, and (for
``remat`` and ``checkify``, which run the function) their state updates propagate out.
``eval_shape`` and ``make_jaxpr`` run nothing, so they leave the arguments untouched.

Example:
  >>> import jax
  >>> from refax import nnx
  >>> model = nnx.eval_shape(lambda: nnx.Linear(10_000, 10_000, rngs=nnx.Rngs(0)))
  >>> model.kernel.value
  ShapeDtypeStruct(shape=(10000, 10000), dtype=float32)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
from jax.experimental import checkify as checkify_lib

from refax._graph._flatten import flatten
from refax._graph._unflatten import unflatten
from refax._refs import has_refs, read
from refax._transforms._jit import check_not_bound_method, jit
from refax._transforms._lift import (
    Inputs,
    Static,
    apply_outputs,
    is_node,
    make_pure,
    rebuild_inputs,
    resolve_modes,
    split_inputs,
    static_of,
)
from refax._variables import Variable

__all__ = [
    "remat",
    "checkpoint",
    "eval_shape",
    "checkify",
    "make_jaxpr",
    "cached_partial",
    "jit_partial",
]

A = TypeVar("A")
F = TypeVar("F", bound=Callable[..., Any])


# -- helpers ---------------------------------------------------------------------------------
def _argnums(x: int | Sequence[int] | None) -> tuple[int, ...]:
    if x is None:
        return ()
    return (x,) if isinstance(x, int) else tuple(x)


def _extract_static(args: tuple, argnums: tuple[int, ...], transform: str) -> tuple[tuple, tuple]:
    """Removes the static positional arguments: ``(dynamic_args, ((index, value), ...))``."""
    if not argnums:
        return args, ()
    n = len(args)
    nums = sorted({i % n for i in argnums if -n <= i < n})
    static = tuple((i, args[i]) for i in nums)
    for i, v in static:
        try:
            hash(v)
        except TypeError:
            raise ValueError(
                f"nnx.{transform}: static argument {i} ({type(v).__name__}) is not hashable; "
                "static arguments must be hashable (use a tuple instead of a list)."
            ) from None
    return tuple(a for i, a in enumerate(args) if i not in nums), static


def _insert_static(args: tuple, static: tuple) -> tuple:
    if not static:
        return args
    out = list(args)
    for i, v in static:
        out.insert(i, v)
    return tuple(out)


def _raw(leaf: Any) -> Any:
    return leaf._raw_value if isinstance(leaf, Variable) else leaf


def _plain(leaf: Any) -> Any:
    """A leaf's raw value with any mutable array reference read (references cannot leave a
    JAX transform)."""
    value = _raw(leaf)
    return read(value) if has_refs(value) else value


def check_no_shared(inputs: Inputs, transform: str) -> None:
    """Without graph updates, an object or Variable reachable twice in the arguments is an
    error: each argument is handled as an independent pytree."""
    if inputs.walk.num_refs:
        raise ValueError(
            f"Duplicate object or Variable found in the arguments of nnx.{transform}: with "
            "graph=False or graph_updates=False the arguments are independent pytrees, so "
            "the same Variable cannot appear twice (duplicate inputs). Pass it once, or use "
            "graph=True and graph_updates=True."
        )


def check_no_input_outputs(nodes: Sequence[Any], out: Any, transform: str) -> None:
    """Without graph updates, returning an input object or Variable is an error (the output
    would alias the input)."""
    ids = {id(x) for x in flatten(tuple(nodes)).nodes}
    for x in jax.tree_util.tree_leaves(out, is_leaf=is_node):
        if is_node(x) and id(x) in ids:
            raise ValueError(
                f"nnx.{transform} returned an input {type(x).__name__} as an output: with "
                "graph=False or graph_updates=False an output cannot alias an input Variable "
                "(input Variables returned as outputs). Return a copy (nnx.clone) or its "
                "value instead."
            )


def split_output(out: Any) -> tuple[Static, list[Any], list[Any]]:
    """An output alone (no link to the inputs) as ``(Static(structure), values, other)``."""
    leaves, treedef = jax.tree_util.tree_flatten(out, is_leaf=is_node)
    pos = tuple(i for i, x in enumerate(leaves) if is_node(x))
    if not pos:
        return Static((treedef, (), None)), [], leaves
    nodes = tuple(leaves[i] for i in pos)
    for i in pos:
        leaves[i] = None
    walk = flatten(nodes)
    return Static((treedef, pos, walk.graphdef)), [_plain(x) for x in walk.leaves], leaves


def merge_output(structure: tuple, values: Sequence[Any], other: Sequence[Any]) -> Any:
    """Inverse of :func:`split_output`: new objects holding ``values``."""
    treedef, pos, graphdef = structure
    leaves = list(other)
    if pos:
        nodes = unflatten(graphdef, list(values), flat=True)
        for p, n in zip(pos, nodes):
            leaves[p] = n
    return jax.tree_util.tree_unflatten(treedef, leaves)


# -- remat -----------------------------------------------------------------------------------
def remat(
    f: F | None = None,
    *,
    prevent_cse: bool = True,
    static_argnums: int | tuple[int, ...] = (),
    policy: Callable[..., bool] | None = None,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Lifted ``jax.checkpoint``: recompute ``f``'s activations in the backward pass.

    Usable as ``@nnx.remat``, ``@nnx.remat(policy=...)`` or ``nnx.remat(f, ...)``, also on
    methods in a class body. Objects in the arguments are rebuilt inside the checkpointed
    function and their state updates propagate out; values and gradients are the same as
    without ``remat``.

    Args:
      f: the function to checkpoint.
      prevent_cse: passed to ``jax.checkpoint``.
      static_argnums: positional arguments treated as static Python values (must be hashable).
      policy: a ``jax.checkpoint_policies`` policy saying which intermediates may be saved.
      graph: accepted for API compatibility but not used: shared references among the
        arguments are allowed or refused as ``nnx.set_graph_mode`` says.
      graph_updates: accepted for API compatibility but not used: Variable values and
        structural changes always propagate.

    Returns:
      The checkpointed function (or a decorator when ``f`` is omitted).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> class Block(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.linear = nnx.Linear(2, 2, rngs=rngs)
      ...   @nnx.remat
      ...   def __call__(self, x):
      ...     return jnp.tanh(self.linear(x))
      >>> block = Block(nnx.Rngs(0))
      >>> grads = nnx.grad(lambda m, x: m(x).sum())(block, jnp.ones((1, 2)))
      >>> grads['linear']['kernel'].value.shape
      (2, 2)
    """
    if f is None:
        return functools.partial(
            remat,
            prevent_cse=prevent_cse,
            static_argnums=static_argnums,
            policy=policy,
            graph=graph,
            graph_updates=graph_updates,
        )
    check_not_bound_method(f, "remat")
    argnums = _argnums(static_argnums)

    def call(args: tuple, kwargs: dict, static_args: tuple) -> Any:
        return f(*_insert_static(args, static_args), **kwargs)

    checkpointed = jax.checkpoint(make_pure(call), prevent_cse=prevent_cse, policy=policy)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args, static_args = _extract_static(args, argnums, "remat")
        inputs = split_inputs(args, kwargs)
        info, values, out_other = checkpointed(
            static_of(inputs, static_args), inputs.values, inputs.other
        )
        return apply_outputs(inputs, info.value, values, out_other)

    return wrapper


checkpoint = remat


# -- eval_shape ------------------------------------------------------------------------------
def eval_shape(
    f: Callable[..., A],
    *args: Any,
    graph: bool | None = None,
    graph_updates: bool | None = None,
    **kwargs: Any,
) -> A:
    """Lifted ``jax.eval_shape``: the output of ``f(*args, **kwargs)`` without computing it.

    Nothing runs: arrays in the output become ``jax.ShapeDtypeStruct``, and objects in the
    output are new abstract objects of the same structure whose Variables hold
    ``ShapeDtypeStruct`` values (useful to build a large model's skeleton, then fill it from a
    checkpoint). The arguments' objects are not modified.

    Args:
      f: the function to evaluate.
      *args: positional arguments; may contain objects.
      graph: ``False`` selects tree mode (see below).
      graph_updates: ``False`` refuses aliasing (see below).
      **kwargs: keyword arguments; may contain objects.

    Returns:
      The abstract output.

    With ``graph=False`` or ``graph_updates=False`` the arguments are independent pytrees: a
    Variable passed twice, or an input Variable returned as the output, raises ``ValueError``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> lin = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      >>> nnx.eval_shape(lambda m, x: m(x), lin, jnp.ones((8, 3)))
      ShapeDtypeStruct(shape=(8, 4), dtype=float32)
    """
    check_not_bound_method(f, "eval_shape")
    graph, updates = resolve_modes(graph, graph_updates)
    inputs = split_inputs(args, kwargs, graph=graph)
    if not updates:
        check_no_shared(inputs, "eval_shape")

    def pure(static: Static, values: list[Any], other: list[Any]) -> Any:
        a, kw, nodes, _ = rebuild_inputs(static.value, values, other)
        out = f(*a, **kw)
        if not updates:
            check_no_input_outputs(nodes, out, "eval_shape")
        return split_output(out)

    s, values, other = jax.eval_shape(pure, static_of(inputs), inputs.values, inputs.other)
    return merge_output(s.value, values, other)


# -- checkify --------------------------------------------------------------------------------
def checkify(
    f: Callable[..., A],
    errors: frozenset[Any] = checkify_lib.user_checks,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Callable[..., tuple[Any, A]]:
    """Lifted ``jax.experimental.checkify.checkify``: ``(error, output)`` instead of raising.

    The checked function runs once; objects among its arguments are rebuilt inside and every
    update it makes to them (new Variable values and structural changes) propagates back to
    the caller's objects, whether a check failed or not. ``err.throw()`` raises the first
    failed check, if any.

    Args:
      f: the function to check; may take and return objects.
      errors: the set of checks to enable (``checkify.user_checks`` by default, i.e.
        ``checkify.check`` calls; also ``checkify.float_checks``, ``index_checks``, ...).
      graph: accepted for API compatibility but not used: shared references among the
        arguments are allowed or refused as ``nnx.set_graph_mode`` says.
      graph_updates: accepted for API compatibility but not used: Variable values and
        structural changes always propagate.

    Returns:
      A function returning ``(err, out)``; ``err.get()`` is ``None`` when every check passed.

    Example:
      >>> import jax.numpy as jnp
      >>> from jax.experimental import checkify
      >>> from refax import nnx
      >>> def f(v):
      ...   checkify.check(v.value > 0, 'v must be positive, got {}', v.value)
      ...   return jnp.log(v.value)
      >>> err, out = nnx.checkify(f)(nnx.Param(jnp.array(-1.0)))
      >>> err.get()
      'v must be positive, got -1.0 (`check` failed)'
    """
    check_not_bound_method(f, "checkify")
    checked = checkify_lib.checkify(make_pure(lambda a, kw, _: f(*a, **kw)), errors=errors)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> tuple[Any, A]:
        inputs = split_inputs(args, kwargs)
        err, (info, values, out_other) = checked(static_of(inputs), inputs.values, inputs.other)
        return err, apply_outputs(inputs, info.value, values, out_other)

    return wrapper


# -- make_jaxpr ------------------------------------------------------------------------------
def make_jaxpr(
    f: Callable[..., Any] | None = None,
    *,
    static_argnums: int | Sequence[int] = (),
    return_shape: bool = False,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Lifted ``jax.make_jaxpr``: the ``ClosedJaxpr`` of ``f`` on arguments holding objects.

    The jaxpr's inputs are the state leaves of the argument objects followed by the other
    array leaves; its outputs are the leaves of ``f``'s output (objects contribute their state
    leaves). State updates made inside are not outputs and are not applied: nothing runs.

    Args:
      f: the function (omit it to use ``make_jaxpr(...)`` as a decorator factory).
      static_argnums: positional arguments treated as static Python values.
      return_shape: also return the output's shape, as :func:`eval_shape` would.
      graph: accepted for API compatibility but not used: shared references among the
        arguments are allowed or refused as ``nnx.set_graph_mode`` says.
      graph_updates: must not be ``True``: nothing runs, so there are no updates to propagate
        (the documented API refuses it too). ``None`` and ``False`` are accepted.

    Returns:
      A function returning the ``ClosedJaxpr`` (and the shape with ``return_shape=True``).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> v = nnx.Param(jnp.ones(3))
      >>> jaxpr = nnx.make_jaxpr(lambda v, x: jnp.sin(v.value) * x)(v, 2.0)
      >>> 'sin' in str(jaxpr)
      True
    """
    if graph_updates:
        raise ValueError(
            "nnx.make_jaxpr does not support graph_updates=True: it runs nothing, so there are "
            "no updates to propagate. Leave graph_updates unset or pass False."
        )
    if f is None:
        return functools.partial(
            make_jaxpr, static_argnums=static_argnums, return_shape=return_shape, graph=graph
        )
    check_not_bound_method(f, "make_jaxpr")
    argnums = _argnums(static_argnums)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args, static_args = _extract_static(args, argnums, "make_jaxpr")
        inputs = split_inputs(args, kwargs)
        static = static_of(inputs)

        def pure(values: list[Any], other: list[Any]) -> Any:
            a, kw, _, _ = rebuild_inputs(static.value, values, other)
            return split_output(f(*_insert_static(a, static_args), **kw))

        jaxpr, (s, values, other) = jax.make_jaxpr(pure, return_shape=True)(
            inputs.values, inputs.other
        )
        if return_shape:
            return jaxpr, merge_output(s.value, values, other)
        return jaxpr

    return wrapper


# -- partial application ---------------------------------------------------------------------
def cached_partial(
    f: Callable[..., Any],
    *cached_args: Any,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Callable[..., Any]:
    """``f`` with its first arguments fixed to ``cached_args`` (which may hold objects).

    In the documented API this caches the graph traversal of ``cached_args`` to cut Python
    overhead. refax's lifted transforms already cache that traversal per tuple of argument
    identities (see ``_lift.py``) and reuse it while the objects' structure is unchanged, so
    a plain ``functools.partial`` is as fast; unlike the documented API, the objects'
    structure may change between calls. Each call passes the same objects, so the updates
    ``f`` makes to them (if ``f`` is a lifted transform) accumulate across calls.

    Args:
      f: the function, usually a lifted transform such as an ``nnx.jit`` function.
      *cached_args: the first positional arguments, fixed for every call.
      graph, graph_updates: accepted for API compatibility but not used (``f`` applies its
        own modes).

    Returns:
      ``functools.partial(f, *cached_args)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> forward = nnx.cached_partial(nnx.jit(lambda m, x: m(x)), model)
      >>> forward(jnp.ones((1, 2))).shape
      (1, 3)
    """
    return functools.partial(f, *cached_args)


def jit_partial(
    fun: Callable[..., Any],
    *partial_args: Any,
    in_shardings: Any = None,
    out_shardings: Any = None,
    static_argnums: int | Sequence[int] | None = None,
    static_argnames: str | Sequence[str] | None = None,
    donate_argnums: int | Sequence[int] | None = None,
    donate_argnames: str | Sequence[str] | None = None,
    keep_unused: bool = False,
    device: Any = None,
    backend: str | None = None,
    inline: bool = False,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Callable[..., Any]:
    """``nnx.jit(fun, ...)`` with its first arguments fixed to ``partial_args``.

    Argument indices (``in_shardings`` entries, ``static_argnums``, ``donate_argnums``) count
    ``fun``'s positional parameters, the partial arguments first. Variable updates to the
    partial arguments propagate after each call; values may change between calls without
    retracing (refax's ``jit`` caches the graph walk per argument identity).

    Args:
      fun: the function to jit.
      *partial_args: its first positional arguments, fixed for every call (may hold
        objects; in tree mode they are checked for shared references here).
      in_shardings, out_shardings, static_argnums, static_argnames, donate_argnums,
        donate_argnames, keep_unused, device, backend, inline: as for :func:`jit`,
        with indices counting the partial arguments first.
      graph: ``False`` selects tree mode: objects are handled as pytrees and a shared
        reference among the arguments is an error. None reads ``nnx.set_graph_mode``.
      graph_updates: ``False`` propagates only Variable values, not structural changes.
        None reads ``nnx.set_graph_updates``.

    Returns:
      The jitted function of the remaining arguments (with ``lower``).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> def step(model, x):
      ...   model.bias.value += 1.0
      ...   return model(x)
      >>> step = nnx.jit_partial(step, model)
      >>> step(jnp.ones((4, 2))).shape
      (4, 3)
      >>> _ = step(jnp.ones((4, 2)))
      >>> model.bias.value
      Array([2., 2., 2.], dtype=float32)
    """
    jitted = jit(
        fun,
        in_shardings=in_shardings,
        out_shardings=out_shardings,
        static_argnums=static_argnums,
        static_argnames=static_argnames,
        donate_argnums=donate_argnums,
        donate_argnames=donate_argnames,
        keep_unused=keep_unused,
        device=device,
        backend=backend,
        inline=inline,
        graph=graph,
        graph_updates=graph_updates,
    )
    return jitted.partial(*partial_args)
