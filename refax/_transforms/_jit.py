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

import dataclasses
import functools
import inspect
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax

from refax._config import config
from refax._graph._flatten import flatten, is_graph_node
from refax._graph._graphdef import GraphDef
from refax._transforms._checks import (
    check_not_bound_method,
    check_output_types,
)
from refax._transforms._eval_shape import eval_shape
from refax._transforms._lift import (
    ArgPattern,
    Inputs,
    Static,
    Step,
    apply_outputs,
    split_inputs,
)
from refax._transforms._masks import donation_masks, interleave, split_by_mask
from refax._transforms._prefix import (
    StateSharding,
    check_prefix,
    constrain_outputs,
    leaf_value,
    resolve_leaf_prefixes,
    shard_inside,
)
from refax._transforms._retrace import describe_arguments, log_retrace
from refax._transforms._static_args import as_tuple, extract_static, infer_static, insert_static
from refax._variables import Variable, _set_raw

__all__ = ["jit", "JitWrapped", "StateSharding", "jit_partial", "cached_partial"]


@dataclasses.dataclass(frozen=True, slots=True)
class JitSettings:
    """jit's part of a call's static data (kept per argument structure by the wrapper)."""

    static_args: tuple  # see _static_args.extract_static
    value_mask: tuple[bool, ...]  # donated state leaves
    other_mask: tuple[bool, ...]  # donated other leaves
    in_shardings: tuple | None  # one per state leaf, when in_shardings is given
    out_shardings: _HashableTree | None
    in_paths: tuple  # the state leaves' paths, when in_shardings is given
    donates: bool = False  # any(value_mask) or any(other_mask)


class _Fast:
    """The last call of a wrapper whose positional arguments were each a graph node or a
    plain array (:class:`ArgPattern`), with what ``_prepare`` found for it: a call with the
    same pattern whose walk gives the very same GraphDef skips flattening the arguments and
    looking up the settings. It holds the walk cache entry of that call weakly, tried first
    by the next call's walk lookup (``_cache.still_kept``)."""

    __slots__ = ("pattern", "graphdef", "settings", "static", "entry")

    def __init__(self, pattern: ArgPattern, inputs: Inputs, settings: JitSettings, static: Static):
        self.pattern = pattern
        self.graphdef: GraphDef = inputs.graphdef
        self.settings = settings
        self.static = static
        self.entry: Callable[[], Any] = _weak(inputs.entry)


def _no_entry() -> None:
    return None


def _weak(entry: Any) -> Callable[[], Any]:
    return _no_entry if entry is None else weakref.ref(entry)


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
        self.donate_argnums = as_tuple(donate_argnums)
        self.donate_argnames = as_tuple(donate_argnames)
        self.graph = graph
        self.graph_updates = graph_updates
        try:
            self._signature: inspect.Signature | None = inspect.signature(fun)
        except (TypeError, ValueError):
            self._signature = None
        # like jax.jit: a static parameter may be named by position or by name, and is static
        # whichever way the caller passes it
        self.static_argnums, self.static_argnames = infer_static(
            self._signature, as_tuple(static_argnums), as_tuple(static_argnames)
        )
        self._out_sh = _HashableTree(out_shardings) if out_shardings is not None else None
        self._statics: dict[tuple, tuple] = {}  # per argument structure: masks and Static
        self._last_trace: dict | None = None  # what the last trace saw (explain_retraces)
        self._fast: _Fast | None = None  # the last call's, when its arguments were flat
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
        call = static.value
        settings: JitSettings = call.settings
        in_sh, out_sh = settings.in_shardings, settings.out_shardings
        values = interleave(settings.value_mask, donated_values, kept_values)
        other = interleave(settings.other_mask, donated_other, kept_other)
        if in_sh is not None:
            values = [shard_inside(x, s) for x, s in zip(values, in_sh)]
        step = Step(call, values, other)
        args, kwargs = insert_static(step.args, step.kwargs, settings.static_args)
        if config.explain_retraces:  # only while JAX traces: no cost on cached calls
            current = describe_arguments(self.fun, args, kwargs)
            log_retrace(self.fun, self._last_trace, current)
            self._last_trace = current
        out = self.fun(*args, **kwargs)
        check_output_types(self.fun, out, "jit")
        step.check_tree_mode_output("jit", out)
        if out_sh is not None and _per_variable(out_sh.tree):
            out = _shard_tree(out, out_sh.tree, "out_shardings")  # per-Variable out_shardings
            out_sh = None
        # donated inputs must all come back, or the Variables would keep deleted buffers;
        # inputs with an in_sharding come back laid out by it (as jax.jit's outputs would)
        mask = settings.value_mask
        if in_sh is not None:
            mask = tuple(m or s is not None for m, s in zip(mask, in_sh))
        info, new_values, out_other = step.collect(out, every_input=mask if any(mask) else False)
        if in_sh is not None:
            new_values = _reshard_inputs(info, new_values, in_sh, settings.in_paths)
        if out_sh is not None:
            new_values, out_other = constrain_outputs(out_sh.tree, info, new_values, out_other)
        return Static(info), new_values, out_other

    # -- calling --------------------------------------------------------------------------
    def _prepare(self, args: tuple, kwargs: dict) -> tuple[Inputs, JitSettings, Static]:
        fast, inputs = self._fast, None
        if fast is not None and not kwargs:  # (only without static arguments)
            hint = fast.entry()
            inputs = fast.pattern.split(args, self.graph, self.graph_updates, hint)
            # (a new walk cache entry comes with a new GraphDef, so a hit also means the
            # entry is the one ``fast`` holds)
            if inputs is not None and inputs.graphdef is fast.graphdef:
                return inputs, fast.settings, fast.static
        args, kwargs, static_args = extract_static(
            args, kwargs, self.static_argnums, self.static_argnames, "jit"
        )
        if inputs is None:
            inputs = split_inputs(args, kwargs, graph=self.graph, graph_updates=self.graph_updates)
        no_static = not (self.static_argnums or self.static_argnames)
        pattern = ArgPattern.of(inputs, args, kwargs) if no_static else None
        graphdef = inputs.graphdef
        modes = (inputs.graph, inputs.updates)
        key = (id(graphdef), inputs.treedef, inputs.node_pos, static_args, modes)
        hit = self._statics.get(key)
        if hit is not None and hit[0] is graphdef:
            self._fast = _Fast(pattern, inputs, hit[1], hit[2]) if pattern else None
            return inputs, hit[1], hit[2]
        n = len(inputs.values)
        if self.donate_argnums or self.donate_argnames:
            value_mask, other_mask = donation_masks(
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
        donates = any(value_mask) or any(other_mask)
        settings = JitSettings(
            static_args, value_mask, other_mask, in_sh, self._out_sh, in_paths, donates
        )
        static = inputs.static(settings)
        if len(self._statics) >= 64:
            self._statics.pop(next(iter(self._statics)))
        # holding the GraphDef keeps its id from being reused while the entry lives
        self._statics[key] = (graphdef, settings, static)
        self._fast = _Fast(pattern, inputs, settings, static) if pattern else None
        return inputs, settings, static

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        n_cached = len(self._statics)
        inputs, settings, static = self._prepare(args, kwargs)
        if not settings.donates:
            info, values, out_other = self._jitted(static, [], inputs.values, [], inputs.other)
            return apply_outputs(inputs, info.value, values, out_other)
        dv, kv = split_by_mask(settings.value_mask, inputs.values)
        do, ko = split_by_mask(settings.other_mask, inputs.other)
        if dv and len(self._statics) != n_cached:  # a new structure: this call compiles
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                info, values, out_other = self._jitted(static, dv, kv, do, ko)
            _rewarn_donation(caught, inputs, settings.value_mask)
        else:
            info, values, out_other = self._jitted(static, dv, kv, do, ko)
        return apply_outputs(inputs, info.value, values, out_other)

    def lower(self, *args: Any, **kwargs: Any) -> Lowered:
        """``jax.jit(...).lower`` on the pure function: a :class:`Lowered` whose ``compile()``
        is called with the same kind of arguments as this function (objects included, their
        updates propagated); other attributes (``as_text``, ``cost_analysis``...) are JAX's."""
        inputs, settings, static = self._prepare(args, kwargs)
        dv, kv = split_by_mask(settings.value_mask, inputs.values)
        do, ko = split_by_mask(settings.other_mask, inputs.other)
        return Lowered(self, static, self._jitted.lower(static, dv, kv, do, ko))

    def partial(self, *args: Any) -> JitPartial:
        """This function with its first positional arguments fixed to ``args``."""
        return JitPartial(self, args)

    def eval_shape(self, *args: Any, **kwargs: Any) -> Any:
        return eval_shape(self.fun, *args, **kwargs)


class JitPartial:
    """An :class:`JitWrapped` with its first positional arguments fixed (``nnx.jit_partial``).

    In tree mode the fixed arguments are checked for shared references when it is made.
    """

    def __init__(self, wrapped: JitWrapped, args: tuple):
        # in tree mode, splitting raises on a shared reference
        split_inputs(args, {}, graph=wrapped.graph, graph_updates=wrapped.graph_updates)
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
        inputs, settings, static = self._wrapped._prepare(args, kwargs)
        if static != self._static:
            raise ValueError(
                "The compiled nnx.jit function was called with arguments whose structure "
                "(objects' graph, static arguments or pytree layout) differs from the "
                "arguments it was lowered with; lower and compile again for these arguments."
            )
        dv, kv = split_by_mask(settings.value_mask, inputs.values)
        do, ko = split_by_mask(settings.other_mask, inputs.other)
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
def _reshard_inputs(info: Any, values: list, in_sh: tuple, in_paths: tuple) -> list:
    """Lays the returned input leaves out by their in_shardings (every leaf with one is
    returned, changed or not, so the caller's Variables take that layout)."""
    if info.unchanged:
        return [shard_inside(x, in_sh[i]) for i, x in zip(info.changed, values)]
    by_path = {(0, *p): sh for p, sh in zip(in_paths, in_sh)}
    return [shard_inside(x, by_path.get(p)) for x, p in zip(values, info.paths)]


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
    if prefix is None:
        return out
    if is_graph_node(out):
        _shard_object(out, prefix)
        return out
    if isinstance(prefix, (jax.sharding.Sharding, jax.sharding.PartitionSpec)):
        leaves, treedef = jax.tree_util.tree_flatten(out, is_leaf=is_graph_node)
        for x in leaves:
            if is_graph_node(x):
                _shard_object(x, prefix)
        leaves = [x if is_graph_node(x) else shard_inside(x, prefix) for x in leaves]
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
    walk = flatten(node, with_paths=True)
    for leaf, path in zip(walk.leaves, walk.paths):
        if isinstance(leaf, Variable):
            sharding = leaf_value(out_shardings, path, leaf)
            _set_raw(leaf, shard_inside(leaf._raw_value, sharding))


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
      in_shardings: as for :func:`jit`, like ``out_shardings``, ``static_argnums``,
        ``static_argnames``, ``donate_argnums``, ``donate_argnames``, ``keep_unused``,
        ``device``, ``backend`` and ``inline``; argument indices count the partial
        arguments first.
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
