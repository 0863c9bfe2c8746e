"""``nnx.jit``: ``jax.jit`` over functions that take and return refax objects.

Objects may appear anywhere in the arguments and outputs. Every Variable update and every
structural change made inside (attributes added, deleted, re-shared) is propagated back to the
caller's objects; objects returned that were inputs keep their identity.

A repeated call on unchanged objects costs what calling ``jax.jit`` on a list of the same
arrays costs: the graph walk is cached per tuple of argument identities (see ``_lift.py``),
and compilations are cached on the GraphDef.

Example:
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> class Counter(nnx.Module):
  ...   def __init__(self):
  ...     self.count = nnx.Variable(jnp.array(0))
  >>> @nnx.jit
  ... def step(counter, x):
  ...   counter.count += 1
  ...   return 2 * x
  >>> c = Counter()
  >>> step(c, 3.0), step(c, 4.0)
  (Array(6., dtype=float32, weak_type=True), Array(8., dtype=float32, weak_type=True))
  >>> c.count.value
  Array(2, dtype=int32, weak_type=True)
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax

from refax._config import config
from refax._transforms._lift import (
    Inputs,
    Static,
    apply_outputs,
    check_no_input_returned,
    check_output_types,
    collect_outputs,
    is_node,
    rebuild_inputs,
    resolve_modes,
    split_inputs,
)
from refax._transforms._prefix import StateSharding, check_prefix, resolve_leaf_prefixes
from refax._transforms._retrace import describe_arguments, log_retrace

__all__ = ["jit", "JitWrapped", "StateSharding"]


def _as_tuple(x: int | str | Sequence[Any] | None) -> tuple:
    if x is None:
        return ()
    if isinstance(x, (int, str)):
        return (x,)
    return tuple(x)


def _rewarn_donation(caught: list, inputs: Inputs, value_mask: tuple) -> None:
    """Re-emits JAX's 'donated buffers were not usable' warning naming the Variables."""
    for w in caught:
        message = str(w.message)
        if "donated buffers were not usable" not in message:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        walk = inputs.walk
        names = []
        for m, leaf, path in zip(value_mask, walk.leaves, walk.paths):
            if not m:
                continue
            x = getattr(leaf, "_raw_value", leaf)
            spec = f"{getattr(x, 'dtype', '?')}{list(getattr(x, 'shape', ()))}".replace(" ", "")
            if spec in message.replace(" ", ""):
                names.append(f"{type(leaf).__name__} '{'.'.join(map(str, path[1:]))}' ({spec})")
        detail = ", ".join(names) if names else message
        warnings.warn(
            f"nnx.jit could not donate the buffers of: {detail}. They are still valid, but "
            "the step keeps a copy; make the function return an array of the same shape and "
            "dtype for each donated Variable (e.g. an updated value), or stop donating it.",
            UserWarning,
            stacklevel=3,
        )


def _input_leaves(nodes: tuple) -> list[Any]:
    from refax._graph._flatten import flatten

    return flatten(nodes).leaves


def check_not_bound_method(fun: Callable[..., Any], transform: str) -> None:
    """Transforms take functions; a method bound to a Module would be captured by closure."""
    owner = getattr(fun, "__self__", None)
    if owner is not None and is_node(owner):
        raise ValueError(
            f"nnx.{transform} does not take bound methods: it got a method bound to a "
            f"{type(owner).__name__} instance. The "
            "instance would be captured by closure and could not be updated. Decorate the "
            f"method in the class body (@nnx.{transform}) or pass the module as an argument: "
            f"nnx.{transform}(lambda m, *a: m.{getattr(fun, '__name__', 'method')}(*a))(module, "
            "...)."
        )


class JitWrapped:
    """The callable returned by :func:`jit`."""

    def __init__(
        self,
        fun: Callable[..., Any],
        *,
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
    ):
        check_not_bound_method(fun, "jit")
        check_prefix(in_shardings, "in_shardings", "jit", graph, graph_updates)
        check_prefix(out_shardings, "out_shardings", "jit", graph, graph_updates)
        functools.update_wrapper(self, fun)
        self.fun = fun
        self.in_shardings = in_shardings
        self.out_shardings = out_shardings
        self.donate_argnums = _as_tuple(donate_argnums)
        self.donate_argnames = _as_tuple(donate_argnames)
        self.graph = graph
        self.graph_updates = graph_updates
        try:
            self._signature: inspect.Signature | None = inspect.signature(fun)
        except (TypeError, ValueError):
            self._signature = None
        # like jax.jit: a static parameter may be named by position or by name, and is static
        # whichever way the caller passes it
        self.static_argnums, self.static_argnames = _infer_static(
            self._signature, _as_tuple(static_argnums), _as_tuple(static_argnames)
        )
        self._out_sh = _HashableTree(out_shardings) if out_shardings is not None else None
        self._statics: dict[tuple, tuple] = {}  # per argument structure: masks and Static
        self._last_trace: dict | None = None  # what the last trace saw (explain_retraces)
        jit_kwargs: dict[str, Any] = {"keep_unused": keep_unused, "inline": inline}
        if device is not None:
            jit_kwargs["device"] = device
        if backend is not None:
            jit_kwargs["backend"] = backend
        self._jitted = jax.jit(self._pure, static_argnums=(0,), donate_argnums=(1, 3), **jit_kwargs)

    # -- descriptor: decorating a method in a class body ------------------------------------
    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return functools.partial(self, obj)

    # -- the pure function JAX traces ----------------------------------------------------
    def _pure(
        self,
        static: Static,
        donated_values: list[Any],
        kept_values: list[Any],
        donated_other: list[Any],
        kept_other: list[Any],
    ):
        graphdef, treedef, node_pos, extra = static.value
        static_args, value_mask, other_mask, in_sh, out_sh, modes, _ = extra
        values = _interleave(value_mask, donated_values, kept_values)
        other = _interleave(other_mask, donated_other, kept_other)
        if in_sh is not None:
            values = [_constrain(x, s) for x, s in zip(values, in_sh)]
        args, kwargs, nodes, built = rebuild_inputs(static.value, values, other)
        args, kwargs = _insert_static(args, kwargs, static_args)
        if config.explain_retraces:  # only while JAX traces: no cost on cached calls
            current = describe_arguments(self.fun, args, kwargs)
            log_retrace(self.fun, self._last_trace, current)
            self._last_trace = current
        graph_updates = modes[1]  # per call (in the Static): the wrapper keeps no call state
        input_leaves = None if graph_updates else _input_leaves(nodes)
        out = self.fun(*args, **kwargs)
        check_output_types(self.fun, out, "jit")
        if not modes[0]:
            check_no_input_returned("jit", input_leaves, out)
        if out_sh is not None and _per_variable(out_sh.tree):
            out = _shard_tree(out, out_sh.tree, "out_shardings")  # per-Variable out_shardings
            out_sh = None
        # donated inputs must all come back, or the Variables would keep deleted buffers;
        # inputs with an in_sharding come back laid out by it (as jax.jit's outputs would)
        mask = value_mask
        if in_sh is not None:
            mask = tuple(m or s is not None for m, s in zip(value_mask, in_sh))
        info, new_values, out_other = collect_outputs(
            graphdef,
            values,
            nodes,
            built,
            out,
            graph_updates=graph_updates,
            input_leaves=input_leaves,
            every_input=mask if any(mask) else False,
        )
        if in_sh is not None:
            new_values = _reshard_inputs(info, new_values, in_sh, extra_paths(static))
        if out_sh is not None:
            new_values, out_other = _constrain_outputs(out_sh, info, new_values, out_other)
        return Static(info), new_values, out_other

    # -- calling --------------------------------------------------------------------------
    def _prepare(self, args: tuple, kwargs: dict) -> tuple[Inputs, tuple, Static]:
        args, kwargs, static_args = _extract_static(
            args, kwargs, self.static_argnums, self.static_argnames
        )
        modes = resolve_modes(self.graph, self.graph_updates)
        inputs = split_inputs(args, kwargs, graph=modes[0])
        graphdef = inputs.graphdef
        key = (id(graphdef), inputs.treedef, inputs.node_pos, static_args, modes)
        hit = self._statics.get(key)
        if hit is not None and hit[0] is graphdef:
            return inputs, hit[1], hit[2]
        n = len(inputs.values)
        if self.donate_argnums or self.donate_argnames:
            value_mask, other_mask = _donation_masks(
                inputs, args, kwargs, self.donate_argnums, self.donate_argnames
            )
        else:
            value_mask, other_mask = (False,) * n, (False,) * len(inputs.other)
        in_sh = (
            resolve_leaf_prefixes(inputs, args, kwargs, self.in_shardings)
            if self.in_shardings is not None
            else None
        )
        in_paths = tuple(inputs.walk.paths) if in_sh is not None else ()
        extra = (static_args, value_mask, other_mask, in_sh, self._out_sh, modes, in_paths)
        static = Static((graphdef, inputs.treedef, inputs.node_pos, extra))
        if len(self._statics) >= 64:
            self._statics.pop(next(iter(self._statics)))
        # holding the GraphDef keeps its id from being reused while the entry lives
        self._statics[key] = (graphdef, (value_mask, other_mask), static)
        return inputs, (value_mask, other_mask), static

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        n_cached = len(self._statics)
        inputs, (value_mask, other_mask), static = self._prepare(args, kwargs)
        dv, kv = _split_by_mask(value_mask, inputs.values)
        do, ko = _split_by_mask(other_mask, inputs.other)
        if dv and len(self._statics) != n_cached:  # a new structure: this call compiles
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                info, values, out_other = self._jitted(static, dv, kv, do, ko)
            _rewarn_donation(caught, inputs, value_mask)
        else:
            info, values, out_other = self._jitted(static, dv, kv, do, ko)
        return apply_outputs(inputs, info.value, values, out_other)

    def lower(self, *args: Any, **kwargs: Any) -> Lowered:
        """``jax.jit(...).lower`` on the pure function: a :class:`Lowered` whose ``compile()``
        is called with the same kind of arguments as this function (objects included, their
        updates propagated); other attributes (``as_text``, ``cost_analysis``...) are JAX's."""
        inputs, (value_mask, other_mask), static = self._prepare(args, kwargs)
        dv, kv = _split_by_mask(value_mask, inputs.values)
        do, ko = _split_by_mask(other_mask, inputs.other)
        return Lowered(self, static, self._jitted.lower(static, dv, kv, do, ko))

    def partial(self, *args: Any) -> JitPartial:
        """This function with its first positional arguments fixed to ``args``."""
        return JitPartial(self, args)

    def eval_shape(self, *args: Any, **kwargs: Any) -> Any:
        from refax._transforms._misc import eval_shape

        return eval_shape(self.fun, *args, **kwargs)


class JitPartial:
    """An :class:`JitWrapped` with its first positional arguments fixed (``nnx.jit_partial``).

    In tree mode the fixed arguments are checked for shared references when it is made.
    """

    def __init__(self, wrapped: JitWrapped, args: tuple):
        graph = resolve_modes(wrapped.graph, wrapped.graph_updates)[0]
        if not graph:
            split_inputs(args, {}, graph=False)  # raises on a shared reference
        self.func, self.args = wrapped, args
        functools.update_wrapper(self, wrapped.fun)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*self.args, *args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Lowered:
        lowered = self.func.lower(*self.args, *args, **kwargs)
        lowered._bound = self.args
        return lowered


class Lowered:
    """What :meth:`JitWrapped.lower` returns: JAX's ``Lowered``, compiled for objects."""

    def __init__(self, wrapped: JitWrapped, static: Static, lowered: Any):
        self._wrapped, self._static, self._lowered = wrapped, static, lowered
        self._bound: tuple = ()

    def compile(self, *args: Any, **kwargs: Any) -> Compiled:
        compiled = Compiled(self._wrapped, self._static, self._lowered.compile(*args, **kwargs))
        compiled._bound = self._bound
        return compiled

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._lowered, name)


class Compiled:
    """A compiled ``nnx.jit`` function: call it with the arguments it was lowered for (the
    same structure); Variable updates propagate as with the jitted function."""

    def __init__(self, wrapped: JitWrapped, static: Static, compiled: Any):
        self._wrapped, self._static, self._compiled = wrapped, static, compiled
        self._bound: tuple = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = (*self._bound, *args)
        inputs, (value_mask, other_mask), static = self._wrapped._prepare(args, kwargs)
        if static != self._static:
            raise ValueError(
                "The compiled nnx.jit function was called with arguments whose structure "
                "(objects' graph, static arguments or pytree layout) differs from the "
                "arguments it was lowered with; lower and compile again for these arguments."
            )
        dv, kv = _split_by_mask(value_mask, inputs.values)
        do, ko = _split_by_mask(other_mask, inputs.other)
        info, values, out_other = self._compiled(dv, kv, do, ko)
        return apply_outputs(inputs, info.value, values, out_other)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._compiled, name)


def jit(
    fun: Callable[..., Any] | None = None,
    *,
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
) -> Any:
    """Lifted ``jax.jit``: objects in the arguments and outputs, state changes propagated.

    Usable as ``@nnx.jit``, ``@nnx.jit(static_argnums=...)`` or ``nnx.jit(f, ...)``; also on
    methods in a class body. Every Variable update and structural change made inside (new or
    deleted attributes, new sharing) reaches the caller's objects; an input object returned
    keeps its identity. Calls are cached per argument structure: a repeated call on unchanged
    objects costs about what ``jax.jit`` on the same arrays costs. Set
    ``refax.config.explain_retraces`` to log why a call traced again.

    Args:
      fun: the function; omit it to use ``nnx.jit(...)`` as a decorator.
      in_shardings: shardings of the arguments: a sharding, or a prefix of the arguments
        whose entries for objects may be ``StateSharding`` s or States of shardings; the
        caller's Variables are laid out by them.
      out_shardings: the same for the outputs (objects created inside are placed by it).
      static_argnums, static_argnames: arguments that are static (hashable) values; each
        completes the other from the function's signature, as in ``jax.jit``.
      donate_argnums, donate_argnames: arguments whose Variables' buffers are donated.
      keep_unused, device, backend, inline: as for ``jax.jit``.
      graph: graph mode (True: shared references allowed) or tree mode (False); None reads
        ``nnx.set_graph_mode``.
      graph_updates: whether structural changes made inside propagate out (without them only
        Variable values do); None reads ``nnx.set_graph_updates``.

    Returns:
      The jitted function (with ``lower`` and ``eval_shape``).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from refax import nnx
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
      >>> @nnx.jit
      ... def train_step(model, optimizer, x, y):
      ...   loss, grads = nnx.value_and_grad(lambda m: ((m(x) - y) ** 2).mean())(model)
      ...   optimizer.update(model, grads)
      ...   return loss
      >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
      >>> first = train_step(model, optimizer, x, y)
      >>> bool(train_step(model, optimizer, x, y) < first), int(optimizer.step[...])
      (True, 2)
    """
    kwargs = dict(
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
    if fun is None:
        return lambda f: JitWrapped(f, **kwargs)
    return JitWrapped(fun, **kwargs)


# -- helpers ---------------------------------------------------------------------------------
def _infer_static(
    signature: inspect.Signature | None, argnums: tuple, argnames: tuple
) -> tuple[tuple, tuple]:
    """Completes ``static_argnums`` / ``static_argnames`` from each other by the signature."""
    if signature is None or not (argnums or argnames):
        return argnums, argnames
    params = list(signature.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return argnums, argnames
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    n = sum(p.kind in positional for p in params)
    nums, names = list(argnums), list(argnames)
    for i, p in enumerate(params[:n]):
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            if p.name in argnames and i not in nums:
                nums.append(i)
            if (i in argnums or i - n in argnums) and p.name not in names:
                names.append(p.name)
    return tuple(nums), tuple(names)


def _extract_static(
    args: tuple, kwargs: dict, argnums: tuple, argnames: tuple
) -> tuple[tuple, dict, tuple]:
    if not argnums and not argnames:
        return args, kwargs, ()
    n = len(args)
    nums = tuple(sorted(i % n if i < 0 else i for i in argnums if -n <= i < n))
    static_pos = tuple((i, args[i]) for i in nums)
    static_kw = tuple((k, kwargs[k]) for k in argnames if k in kwargs)
    for _, v in (*static_pos, *static_kw):
        try:
            hash(v)
        except TypeError:
            raise ValueError(
                f"Static argument {v!r} of type {type(v).__name__} is not hashable; static "
                "arguments of nnx.jit must be hashable (use a tuple instead of a list)."
            ) from None
    args = tuple(a for i, a in enumerate(args) if i not in nums)
    kwargs = {k: v for k, v in kwargs.items() if k not in argnames}
    return args, kwargs, (static_pos, static_kw)


def _insert_static(args: tuple, kwargs: dict, static_args: tuple) -> tuple[tuple, dict]:
    if not static_args:
        return args, kwargs
    static_pos, static_kw = static_args
    args = list(args)
    for i, v in static_pos:
        args.insert(i, v)
    return tuple(args), {**kwargs, **dict(static_kw)}


def _split_by_mask(mask: tuple, xs: Sequence[Any]) -> tuple[list, list]:
    if not any(mask):
        return [], list(xs)
    return [x for m, x in zip(mask, xs) if m], [x for m, x in zip(mask, xs) if not m]


def _interleave(mask: tuple, a: list, b: list) -> list:
    if not a:
        return b
    ia, ib = iter(a), iter(b)
    return [next(ia) if m else next(ib) for m in mask]


def _donation_masks(
    inputs: Inputs, args: tuple, kwargs: dict, argnums: tuple, argnames: tuple
) -> tuple[tuple, tuple]:
    """Which state values and other leaves belong to donated arguments."""
    donated_args = {i % len(args) if i < 0 else i for i in argnums if -len(args) <= i < len(args)}
    owners: list[Any] = []  # the top-level argument (index or name) of every flat leaf
    for i, a in enumerate(args):
        owners += [i] * len(jax.tree_util.tree_leaves(a, is_leaf=_is_leaf_or_none))
    for k in sorted(kwargs):
        owners += [k] * len(jax.tree_util.tree_leaves(kwargs[k], is_leaf=_is_leaf_or_none))
    leaf_owner = [owners[i] if i < len(owners) else None for i in range(len(inputs.other))]
    donated = [o in donated_args or o in argnames for o in leaf_owner]
    other_mask = tuple(d and inputs.other[i] is not None for i, d in enumerate(donated))
    node_donated = [donated[p] for p in inputs.node_pos]
    value_mask = tuple(node_donated[path[0]] for path in inputs.walk.paths)
    return value_mask, other_mask


def _is_leaf_or_none(x: Any) -> bool:
    return is_node(x)


def extra_paths(static: Static) -> tuple:
    """The input leaves' paths kept in a call's Static (only when in_shardings are set)."""
    return static.value[3][6]


def _reshard_inputs(info: Any, values: list, in_sh: tuple, in_paths: tuple) -> list:
    """Lays the returned input leaves out by their in_shardings (every leaf with one is
    returned, changed or not, so the caller's Variables take that layout)."""
    if info.unchanged:
        return [_constrain(x, in_sh[i]) for i, x in zip(info.changed, values)]
    by_path = {(0, *p): sh for p, sh in zip(in_paths, in_sh)}
    return [_constrain(x, by_path.get(p)) for x, p in zip(values, info.paths)]


def _constrain(x: Any, sharding: Any) -> Any:
    from refax._transforms._prefix import shard_inside

    return shard_inside(x, sharding)


class _HashableTree:
    """Holds an out_shardings tree as static data (compared by identity of its contents)."""

    __slots__ = ("tree",)

    def __init__(self, tree: Any):
        self.tree = tree

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _HashableTree) and self.tree is other.tree

    def __hash__(self) -> int:
        return id(self.tree)


def _per_variable(out_shardings: Any) -> bool:
    return not isinstance(out_shardings, (jax.sharding.Sharding, jax.sharding.PartitionSpec))


def _shard_tree(out: Any, prefix: Any, what: str) -> Any:
    """Lays ``out`` out by a prefix of it: a sharding covers everything below it; an object
    takes a sharding, a StateSharding, ``nnx.prefix``'s result or a State of shardings, and
    its Variables are laid out in place (so the object's new values are the laid-out ones)."""
    from refax._transforms._prefix import shard_inside

    if prefix is None:
        return out
    if is_node(out):
        _shard_object(out, prefix)
        return out
    if isinstance(prefix, (jax.sharding.Sharding, jax.sharding.PartitionSpec)):
        leaves, treedef = jax.tree_util.tree_flatten(out, is_leaf=is_node)
        for x in leaves:
            if is_node(x):
                _shard_object(x, prefix)
        leaves = [x if is_node(x) else shard_inside(x, prefix) for x in leaves]
        return jax.tree_util.tree_unflatten(treedef, leaves)
    if isinstance(prefix, (tuple, list)) and isinstance(out, (tuple, list)):
        if len(prefix) != len(out):
            raise ValueError(
                f"nnx.jit {what} has {len(prefix)} entries but the function returned "
                f"{len(out)} values."
            )
        items = [_shard_tree(x, p, what) for x, p in zip(out, prefix)]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    if isinstance(prefix, dict) and isinstance(out, dict) and set(prefix) <= set(out):
        return {k: _shard_tree(v, prefix.get(k), what) for k, v in out.items()}
    raise ValueError(
        f"nnx.jit {what}: a {type(prefix).__name__} is not a prefix of the returned "
        f"{type(out).__name__}. Give one sharding for everything, or a tuple/dict shaped like "
        "the outputs whose entries for objects are shardings, StateShardings, nnx.prefix "
        "results or States of shardings."
    )


def _shard_object(node: Any, out_shardings: Any) -> None:
    """Lays out the Variables of a returned object by a per-Variable prefix."""
    from refax._graph._flatten import flatten
    from refax._transforms._prefix import _leaf_value, shard_inside
    from refax._variables import Variable, _set_raw

    walk = flatten(node, with_paths=True)
    for leaf, path in zip(walk.leaves, walk.paths):
        if isinstance(leaf, Variable):
            sharding = _leaf_value(out_shardings, path, leaf)
            _set_raw(leaf, shard_inside(leaf._raw_value, sharding))


def _constrain_outputs(out_sh: _HashableTree, info: Any, values: list, out_other: list):
    from refax._transforms._prefix import constrain_outputs

    return constrain_outputs(out_sh.tree, info, values, out_other)
