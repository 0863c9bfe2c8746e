"""Wrappers: a Linen module as a refax Module (``ToNNX``) and a refax Module inside Linen
(``ToLinen`` / ``to_linen``).

``ToNNX`` holds the Linen module (static) and its variables as ordinary refax Variables,
one attribute per top-level Linen name (submodules become nested dicts), so refax's graph
functions, transforms, optimizers and sharding helpers see them like a native model's.
Nothing exists before the first call: ``bridge.lazy_init`` (or ``ToNNX.lazy_init``) runs the
model once with Linen's ``init`` and keeps what it made. Every later call runs Linen's
``apply`` with fresh keys drawn from the wrapper's :class:`~refax.Rngs` (one per stream, so
dropout differs from call to call and ``nnx.reseed`` replays it) and writes back the
collections named in ``mutable``.

``ToLinen`` is a Linen module that builds the refax Module inside ``init`` (with an
``Rngs`` whose streams are Linen's ``make_rng`` keys) and stores its Variables in Linen
collections named after their types. ``apply`` rebuilds the Module abstractly
(``nnx.eval_shape``, no initializer runs), loads the Linen variables into it, gives its RNG
streams fresh keys from ``make_rng``, runs it, and puts back the collections Linen allows to
change.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import FrozenDict

import refax as _nnx
from refax._rngs import RngState, RngStream
from refax._variables import Variable
from refax.nnx.bridge import _context
from refax.nnx.bridge._variables import (
    flatten_collections,
    linen_collection,
    nest,
    to_linen_var,
    to_nnx_var,
)

__all__ = ["ToNNX", "ToLinen", "to_linen", "lazy_init", "linen_rngs_dict"]

M = TypeVar("M")
_OWN = frozenset({"module", "to_nnx__rngs"})


# -- keys: refax Rngs -> Linen rngs ------------------------------------------------------------
def linen_rngs_dict(rngs: Any) -> dict[str, jax.Array]:
    """Linen's ``rngs`` argument from a refax :class:`~refax.Rngs` (one fresh key per stream,
    the ``default`` stream serving as ``params`` when there is no ``params`` stream), a key,
    a seed, or a dict of keys (returned as is).

    Example:
      >>> from refax import nnx
      >>> from refax.nnx import bridge
      >>> sorted(bridge.linen_rngs_dict(nnx.Rngs(0, dropout=1)))
      ['dropout', 'params']
    """
    if rngs is None:
        return {}
    if isinstance(rngs, _nnx.Rngs):
        # one fork per stream and call (the reference's derivation: same seed, same params)
        out = {name: stream.fork()() for name, stream in rngs.items()}
        if "default" in out and "params" not in out:
            out["params"] = out.pop("default")
        return out
    if isinstance(rngs, RngStream):
        return {"params": rngs.fork()()}
    if isinstance(rngs, Mapping):
        return dict(rngs)
    if isinstance(rngs, int):
        return {"params": jax.random.key(rngs)}
    return {"params": rngs}


# -- ToNNX -----------------------------------------------------------------------------------
def _is_own(name: Any) -> bool:
    return name in _OWN or (isinstance(name, str) and name.startswith("_"))


class ToNNX(_nnx.Module):
    """A Linen module used as a refax Module.

    Call :meth:`lazy_init` (or :func:`lazy_init` on a model that contains the wrapper) once
    with example inputs: it runs Linen's ``init`` and stores every Linen variable as a refax
    Variable attribute (``params`` -> :class:`~refax.Param`, ``batch_stats`` ->
    :class:`~refax.BatchStat`, other collections -> their registered types; Linen
    partitioning boxes -> ``out_sharding`` / ``sharding_rules`` metadata). Later calls run
    Linen's ``apply`` on them.

    Args:
      module: the Linen module.
      rngs: the refax :class:`~refax.Rngs` whose streams give Linen its keys; each call draws
        one fresh key per stream (``default`` serves as ``params``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from refax import nnx
      >>> from refax.nnx import bridge
      >>> model = bridge.ToNNX(nn.Dense(4), rngs=nnx.Rngs(0)).lazy_init(jnp.ones((1, 3)))
      >>> model.kernel.shape, type(model.bias).__name__
      ((3, 4), 'Param')
      >>> model(jnp.ones((2, 3))).shape
      (2, 4)
    """

    def __init__(self, module: nn.Module, rngs: _nnx.Rngs | None = None):
        self.module = module
        self.to_nnx__rngs = rngs

    # Linen methods other than __call__: ``wrapper.encode(x)`` runs ``module.encode``.
    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_"):
            module = self.__dict__.get("module")
            if module is not None and _user_method(type(module), name):
                return types.MethodType(functools.partial(_call_method, name=name), self)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}")

    def lazy_init(self: M, *args: Any, **kwargs: Any) -> M:
        """Initialises the Linen variables by running the model once; returns ``self``.

        Args:
          *args: example positional inputs.
          **kwargs: example keyword inputs (``method=``, ``rngs=``, ... as for a call).
        """
        return lazy_init(self, *args, **kwargs)

    def __call__(
        self,
        *args: Any,
        rngs: Any = None,
        method: str | Callable[..., Any] | None = None,
        mutable: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Runs the Linen module (``init`` inside :func:`lazy_init`, ``apply`` otherwise).

        Args:
          *args: the Linen module's positional inputs.
          rngs: keys for this call instead of the wrapper's own streams.
          method: the Linen method to run (default ``__call__``).
          mutable: the Linen collections this call may change (written back into the
            wrapper's Variables); by default none, or the enclosing bridge Module's.
          **kwargs: the Linen module's keyword inputs.
        """
        keys = linen_rngs_dict(self.to_nnx__rngs if rngs is None else rngs)
        if mutable is None:
            mutable = _context_mutable()
        if _context.is_initializing():
            existing = set(flatten_collections(self._linen_variables()))
            out, variables = self.module.init_with_output(keys, *args, method=method, **kwargs)
            self._write(variables, skip=existing)
            return out
        result = self.module.apply(
            self._linen_variables(), *args, rngs=keys, method=method, mutable=mutable, **kwargs
        )
        if mutable is False:
            return result
        out, updates = result
        self._write(updates)
        return out

    # the Linen view of the wrapper's Variables
    def _linen_variables(self) -> dict[str, Any]:
        flat: dict[str, list[tuple[tuple, Any]]] = {}
        stack: list[tuple[tuple, Any]] = [
            ((k,), v) for k, v in self.__dict__.items() if not _is_own(k)
        ]
        while stack:
            path, node = stack.pop()
            if isinstance(node, Variable):
                if not isinstance(node, RngState):
                    flat.setdefault(linen_collection(node), []).append((path, to_linen_var(node)))
            elif isinstance(node, Mapping):
                stack.extend(((*path, k), v) for k, v in node.items())
        return {col: nest(items) for col, items in flat.items()}

    def _write(self, variables: Mapping[str, Any], skip: set | frozenset = frozenset()) -> None:
        for (col, path), leaf in flatten_collections(variables).items():
            if (col, path) in skip:
                continue
            _put_path(self, path, to_nnx_var(col, leaf))


def _user_method(cls: type, name: str) -> bool:
    for c in cls.__mro__:
        if c in nn.Module.__mro__:
            return False
        if name in c.__dict__:
            return callable(c.__dict__[name])
    return False


def _call_method(self: ToNNX, *args: Any, name: str, **kwargs: Any) -> Any:
    return self(*args, method=name, **kwargs)


def _context_mutable() -> Any:
    module = _context.current_module()
    scope = getattr(module, "scope", None)
    return False if scope is None else scope.mutable


def _put_path(root: Any, path: tuple, var: Variable) -> None:
    """Stores ``var`` at ``path`` under ``root`` (an Object: attributes, then nested dicts),
    writing into the Variable already there when there is one."""
    node: Any = root
    for i, key in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, Mapping):
            current = node.get(key)
        else:
            current = node.__dict__.get(key) if isinstance(key, str) else None
        if last:
            if isinstance(current, Variable) and type(current) is type(var):
                current.set_value(var.get_value())
                if current.get_metadata() != var.get_metadata():
                    current.set_metadata(var.get_metadata())
                return
            new: Any = var
        elif current is None or isinstance(current, Variable):
            new = {}
        else:
            node = current
            continue
        if isinstance(node, dict):
            node[key] = new
        else:
            setattr(node, key, new)
        node = new


def lazy_init(fn: M | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Runs ``fn`` once so that every ``ToNNX`` it calls creates its Linen variables.

    Args:
      fn: a refax Module (called) or one of its methods (bound methods and
        ``functools.partial`` of them are fine).
      *args: example positional inputs.
      **kwargs: example keyword inputs.

    Returns:
      The Module (``fn`` itself, or the object ``fn`` is bound to).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from refax import nnx
      >>> from refax.nnx import bridge
      >>> class Outer(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.dense = bridge.ToNNX(nn.Dense(2), rngs=rngs)
      ...   def __call__(self, x):
      ...     return self.dense(x)
      >>> model = bridge.lazy_init(Outer(nnx.Rngs(0)), jnp.ones((1, 3)))
      >>> model.dense.kernel.shape
      (3, 2)
    """
    owner: Any = fn
    while isinstance(owner, functools.partial):
        owner = owner.func
    owner = getattr(owner, "__self__", owner)
    with _context.initializing(True):
        fn(*args, **kwargs)  # type: ignore[operator]
    return owner


# -- ToLinen ---------------------------------------------------------------------------------
def _abstract(x: Any) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def _fresh_key(base: Any, index: int, like: jax.ShapeDtypeStruct) -> jax.Array:
    """A concrete key shaped and typed like ``like``, derived from ``base``."""
    key = base
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    key = jax.random.fold_in(key, index)
    if like.shape:
        key = jax.random.split(key, like.shape)
    if not jnp.issubdtype(like.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return key


def _with_default(keys: dict[str, jax.Array]) -> dict[str, Any]:
    """Linen's keys plus a ``default`` stream (derived from ``params``, or seed 0) for the
    streams Linen was given no key for, as Linen's ``make_rng`` falls back to ``params``."""
    if "default" in keys:
        return keys
    params = keys.get("params")
    default = jax.random.fold_in(params, 1) if params is not None else 0
    return {"default": default, **keys}


class ToLinen(nn.Module):
    """A refax Module used inside a Linen model.

    ``init`` builds ``nnx_class(*args, **kwargs, rngs=...)`` with an :class:`~refax.Rngs`
    whose streams are Linen's ``make_rng`` keys, and stores its Variables in Linen
    collections named after their types (``Param`` -> ``params``, ``BatchStat`` ->
    ``batch_stats``, ...). A Variable with metadata of its own (say ``out_sharding``) is
    stored as :class:`~refax.nnx.bridge.NNXMeta`, so ``nn.get_partition_spec`` works on it.
    ``apply`` rebuilds the Module abstractly, loads the variables, reseeds its RNG streams from
    ``make_rng`` (fresh dropout on every ``apply``), and writes back what Linen may change.

    Attributes:
      nnx_class: the refax Module class (or any callable returning a Module).
      args: its positional arguments.
      kwargs: its keyword arguments.
      skip_rng: do not pass ``rngs=`` to the constructor.
      metadata_fn: turns a Variable into its Linen leaf (default :func:`to_linen_var`).
      abstract_init: on ``apply``, build the Module with ``nnx.eval_shape`` (no initializer
        runs) rather than for real.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from refax import nnx
      >>> from refax.nnx import bridge
      >>> model = bridge.ToLinen(nnx.Linear, args=(3, 4))
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> variables["params"]["kernel"].shape
      (3, 4)
      >>> model.apply(variables, jnp.ones((2, 3))).shape
      (2, 4)
    """

    nnx_class: Callable[..., Any]
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = FrozenDict({})
    skip_rng: bool = False
    metadata_fn: Callable[[Variable], Any] | None = to_linen_var
    abstract_init: bool = True

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            cls = self.__dict__.get("nnx_class")
            if cls is not None and not name.startswith("_") and callable(getattr(cls, name, None)):
                return functools.partial(self.__call__, nnx_method=name)
            raise

    @nn.compact
    def __call__(
        self, *args: Any, nnx_method: str | Callable[..., Any] | None = None, **kwargs: Any
    ) -> Any:
        """Runs the refax Module (its ``__call__``, or ``nnx_method``).

        Args:
          *args: the Module's positional inputs.
          nnx_method: the name of another method to run (or a function taking the Module).
          **kwargs: the Module's keyword inputs.
        """
        module_kwargs = dict(self.kwargs)
        keys = {} if self.skip_rng else self._keys()
        if self.is_initializing():
            if not self.skip_rng:
                module_kwargs["rngs"] = _nnx.Rngs(**_with_default(keys))
            module = self.nnx_class(*self.args, **module_kwargs)
            self._store(module)  # the state as built: what the call changes is not kept
        else:
            module = self._rebuild(module_kwargs, keys)
        if nnx_method is None:
            out = module(*args, **kwargs)
        elif isinstance(nnx_method, str):
            out = getattr(module, nnx_method)(*args, **kwargs)
        else:
            out = nnx_method(module, *args, **kwargs)
        if not self.is_initializing():
            self._store(module)
        return out

    def _keys(self) -> dict[str, jax.Array]:
        rngs = getattr(self.scope, "rngs", None) or {}
        return {name: self.make_rng(name) for name in rngs}

    def _rebuild(self, module_kwargs: dict[str, Any], keys: dict[str, jax.Array]) -> Any:
        def build() -> Any:
            kw = dict(module_kwargs)
            if not self.skip_rng:  # building needs keys even when apply gave none for params
                kw["rngs"] = _nnx.Rngs(**_with_default(keys))
            return self.nnx_class(*self.args, **kw)

        if not self.abstract_init:
            module = build()
            self._load(module)
            return module
        module = _nnx.eval_shape(build, graph=True)
        self._load(module)
        # RNG streams are never Linen variables: give the rebuilt ones keys from make_rng
        fallback = keys.get("params", keys.get("default"))
        streams = [n for _, n in _nnx.iter_graph(module, graph=True) if isinstance(n, RngStream)]
        for i, stream in enumerate(streams):
            like = stream.key.get_value()
            if not _abstract(like):
                continue
            base = keys.get(stream.tag, fallback)
            if base is None:
                base = jax.random.key(0)
            stream.key.set_value(_fresh_key(base, i, like))
            count = stream.count.get_value()
            stream.count.set_value(jnp.zeros(count.shape, count.dtype))
        missing = [
            ".".join(map(str, path))
            for path, v in _nnx.iter_graph(module, graph=True)
            if isinstance(v, Variable) and not isinstance(v, RngState) and _abstract(v.get_value())
        ]
        if missing:
            raise ValueError(
                f"ToLinen({getattr(self.nnx_class, '__name__', self.nnx_class)}): the Linen "
                f"variables have no value for {missing}. Pass every collection that init "
                "returned to apply."
            )
        return module

    def _load(self, module: Any) -> None:
        by_path = {
            tuple(map(str, path)): v
            for path, v in _nnx.iter_graph(module, graph=True)
            if isinstance(v, Variable)
        }
        for (col, path), leaf in flatten_collections(self.variables).items():
            new = to_nnx_var(col, leaf)
            var = by_path.get(tuple(map(str, path)))
            if var is None:
                _put_path(module, path, new)
            else:
                var.set_value(new.get_value())

    def _store(self, module: Any) -> None:
        initializing = self.is_initializing()
        convert = self.metadata_fn or (lambda v: v.get_value())
        flat: dict[str, list[tuple[tuple, Any]]] = {}
        for path, v in _nnx.iter_graph(module, graph=True):
            if not isinstance(v, Variable) or isinstance(v, RngState):
                continue
            col = linen_collection(v)
            if initializing or self.is_mutable_collection(col):
                flat.setdefault(col, []).append((tuple(map(str, path)), convert(v)))
        for col, items in flat.items():
            for name, value in nest(items).items():
                self.put_variable(col, name, value)


def to_linen(
    nnx_class: Callable[..., Any],
    *args: Any,
    metadata_fn: Callable[[Variable], Any] | None = to_linen_var,
    name: str | None = None,
    skip_rng: bool = False,
    abstract_init: bool = True,
    **kwargs: Any,
) -> ToLinen:
    """A :class:`ToLinen` for ``nnx_class(*args, **kwargs)``.

    Args:
      nnx_class: the refax Module class.
      *args: its positional arguments.
      metadata_fn: turns a Variable into its Linen leaf.
      name: the Linen module name.
      skip_rng: do not pass ``rngs=`` to the constructor.
      abstract_init: rebuild abstractly on ``apply`` (see :class:`ToLinen`).
      **kwargs: its keyword arguments.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from refax import nnx
      >>> from refax.nnx import bridge
      >>> class Model(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     return bridge.to_linen(nnx.Linear, 3, 2, name="proj")(x)
      >>> variables = Model().init(jax.random.key(0), jnp.ones((1, 3)))
      >>> variables["params"]["proj"]["kernel"].shape
      (3, 2)
    """
    return ToLinen(
        nnx_class,
        args=args,
        kwargs=FrozenDict(kwargs),
        skip_rng=skip_rng,
        metadata_fn=metadata_fn,
        abstract_init=abstract_init,
        name=name,
    )
