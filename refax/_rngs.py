"""Random number streams: ``Rngs``, ``RngStream`` and the RNG Variable types.

Randomness in refax is ordinary state. An :class:`RngStream` holds a base key (an
:class:`RngKey` Variable) and a counter (an :class:`RngCount` Variable); calling the stream
returns ``jax.random.fold_in(key, count)`` and increments the counter in place, so every call
gives a fresh key and the update is propagated like any other Variable update (through
``split``/``merge`` and the lifted transforms). An :class:`Rngs` is a collection of named
streams stored as attributes (``rngs.params``, ``rngs.dropout``); names that were not given
fall back to the ``default`` stream when there is one. Both carry helpers mirroring
``jax.random`` (``rngs.normal(shape)`` is ``jax.random.normal(rngs(), shape)``), each
consuming exactly one key.

Seeds may be ints, typed key arrays (``jax.random.key``), raw ``uint32`` key data
(``jax.random.PRNGKey``) or batches of keys (``jax.random.split(key, n)``, one stream per
``vmap`` lane; the counter then has the batch shape too).

Example:
  >>> import jax.numpy as jnp
  >>> from refax._module import Module
  >>> from refax._variables import Param
  >>> from refax._rngs import Rngs
  >>> class Linear(Module):
  ...   def __init__(self, din, dout, *, rngs):
  ...     self.w = Param(rngs.params.uniform((din, dout)))
  ...     self.b = Param(jnp.zeros((dout,)))
  ...   def __call__(self, x):
  ...     return x @ self.w + self.b
  >>> model = Linear(2, 5, rngs=Rngs(params=0))
  >>> print(model(jnp.ones((1, 2))))
  [[1.5643291  0.94782424 0.37971854 1.0724319  0.22112393]]
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from refax._filters import to_predicate
from refax._graph import iter_graph
from refax._object import Pytree
from refax._variables import Variable

__all__ = [
    "RngState",
    "RngKey",
    "RngCount",
    "RngStream",
    "Rngs",
    "SplitBackups",
    "reseed",
    "backup_keys",
    "restore_rngs",
]

Shape = int | tuple[int, ...]

# jax.random samplers exposed as methods (each draws one key from the stream).
_SAMPLERS = (
    "bits uniform randint permutation choice normal multivariate_normal truncated_normal "
    "bernoulli beta cauchy dirichlet exponential gamma loggamma poisson gumbel categorical "
    "laplace logistic pareto t chisquare f rademacher maxwell double_sided_maxwell "
    "weibull_min orthogonal generalized_normal ball rayleigh wald geometric triangular "
    "lognormal binomial multinomial"
).split()
# jax.nn.initializers factories exposed as keyless-initializer factories.
_INITIALIZERS = (
    "delta_orthogonal glorot_normal glorot_uniform he_normal he_uniform kaiming_normal "
    "kaiming_uniform lecun_normal lecun_uniform variance_scaling xavier_normal xavier_uniform"
).split()


class RngState(Variable[jax.Array]):
    """Base Variable type of all RNG state (filter on it to select keys and counters)."""

    __slots__ = ()


class RngCount(RngState):
    """The ``uint32`` counter of an :class:`RngStream` (metadata ``tag``: the stream name)."""

    __slots__ = ()


class RngKey(RngState):
    """The base key of an :class:`RngStream` (metadata ``tag``: the stream name)."""

    __slots__ = ()


def _describe(value: Any) -> str:
    if isinstance(value, (jax.Array, np.ndarray)):
        return f"{type(value).__name__} of shape {value.shape} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _as_key(seed: Any, tag: str) -> jax.Array:
    """Converts a seed (int, typed key, raw uint32 key data) into a typed key array."""
    if isinstance(seed, numbers.Integral):
        return jax.random.key(int(seed))
    if isinstance(seed, (jax.Array, np.ndarray)):
        dtype = seed.dtype
        if jnp.issubdtype(dtype, jax.dtypes.prng_key):
            return seed  # type: ignore[return-value]
        if dtype == np.uint32 and np.ndim(seed) >= 1:
            try:
                return jax.random.wrap_key_data(jnp.asarray(seed))
            except (TypeError, ValueError) as e:
                raise TypeError(
                    f"Invalid raw key data for RngStream {tag!r}: {_describe(seed)} ({e})"
                ) from None
        if jnp.issubdtype(dtype, jnp.integer) and np.ndim(seed) == 0:
            return jax.random.key(seed)
    raise ValueError(
        f"Invalid rng value for RngStream {tag!r}: {_describe(seed)}; expected an int, a "
        "typed key array (jax.random.key) or raw uint32 key data (jax.random.PRNGKey)."
    )


def _shape(k: Shape) -> tuple[int, ...]:
    return (k,) if isinstance(k, int) else tuple(k)


class _RandomMethods:
    """Mixin: ``jax.random`` samplers and initializer factories drawing keys from ``self()``."""

    __slots__ = ()


def _make_sampler(name: str, fn: Callable[..., Any]) -> Callable[..., jax.Array]:
    def sampler(self: Any, *args: Any, **kwargs: Any) -> jax.Array:
        return fn(self(), *args, **kwargs)

    sampler.__name__ = name
    sampler.__qualname__ = f"_RandomMethods.{name}"
    sampler.__doc__ = (
        f"Returns ``jax.random.{name}(key, *args, **kwargs)`` with ``key`` drawn from this "
        "stream (consumes one key)."
    )
    return sampler


def _make_initializer(name: str, factory: Callable[..., Any]) -> Callable[..., Any]:
    def initializer(self: Any, *args: Any, **kwargs: Any) -> Callable[..., jax.Array]:
        init_fn = factory(*args, **kwargs)

        def keyless_init(*init_args: Any, **init_kwargs: Any) -> jax.Array:
            return init_fn(self(), *init_args, **init_kwargs)

        return keyless_init

    initializer.__name__ = name
    initializer.__qualname__ = f"_RandomMethods.{name}"
    initializer.__doc__ = (
        f"Returns ``jax.nn.initializers.{name}(*args, **kwargs)`` as a keyless initializer "
        "``init(shape, dtype=...)`` that draws its key from this stream on each call."
    )
    return initializer


for _name in _SAMPLERS:
    if hasattr(jax.random, _name):
        setattr(_RandomMethods, _name, _make_sampler(_name, getattr(jax.random, _name)))
for _name in _INITIALIZERS:
    if hasattr(jax.nn.initializers, _name):
        _factory = getattr(jax.nn.initializers, _name)
        setattr(_RandomMethods, _name, _make_initializer(_name, _factory))


class RngStream(_RandomMethods, Pytree):
    """One named stream of keys: a base ``key`` (RngKey) plus a ``count`` (RngCount).

    Args:
      key: the seed: an int, a typed key array or raw ``uint32`` key data; a batch of keys
        gives a vectorised stream (``count`` gets the same batch shape).
      tag: the stream name, stored as metadata ``tag`` on both Variables.

    Example:
      >>> import jax
      >>> from refax._rngs import RngStream
      >>> stream = RngStream(0, tag="dropout")
      >>> key = stream()
      >>> bool((jax.random.key_data(key) == jax.random.key_data(
      ...     jax.random.fold_in(jax.random.key(0), 0))).all())
      True
      >>> int(stream.count[...])
      1
    """

    def __init__(self, key: jax.Array | int, *, tag: str):
        key = _as_key(key, tag)
        self.tag = tag
        self.key = RngKey(key, tag=tag)
        self.count = RngCount(jnp.zeros(key.shape, dtype=jnp.uint32), tag=tag)

    def __call__(self) -> jax.Array:
        """Returns ``fold_in(key, count)`` and increments ``count`` in place."""
        self.count._check_writable()
        key, count = self.key[...], self.count[...]
        if key.ndim != 0:
            raise ValueError(
                f"RngStream {self.tag!r} holds a batch of keys of shape {key.shape}; "
                "draw from it inside jax/nnx vmap (one key per lane) instead."
            )
        self.count[...] = count + 1
        return jax.random.fold_in(key, count)

    def split(self, k: Shape) -> RngStream:
        """Returns a new stream holding ``jax.random.split(self(), k)`` (a batch of keys)."""
        return type(self)(jax.random.split(self(), k), tag=self.tag)

    def fork(self, *, split: Shape | None = None) -> RngStream:
        """Returns a new independent stream seeded with a key drawn from this one.

        ``split`` splits that key into a batch (the spelling the guides document; the same
        as :meth:`split`).
        """
        key = self()
        if split is not None:
            key = jax.random.split(key, split)
        return type(self)(key, tag=self.tag)

    def broadcast(self, k: Shape) -> RngStream:
        """Returns a new stream whose key is one drawn key repeated to shape ``k``."""
        key = self()
        return type(self)(jnp.broadcast_to(key, _shape(k) + key.shape), tag=self.tag)


def _per_stream(spec: Any) -> list[tuple[Callable[..., bool], Any]]:
    if spec is None or isinstance(spec, (int, tuple)):
        spec = {...: spec}
    return [(to_predicate(f), v) for f, v in spec.items()]


def _lookup(rules: list[tuple[Callable[..., bool], Any]], stream: RngStream, missing: Any):
    for pred, value in rules:
        if pred((), stream):
            return value
    return missing


_KEEP = object()


class Rngs(_RandomMethods, Pytree):
    """A set of named :class:`RngStream` s, each stored as an attribute.

    Args:
      default: seed of the ``default`` stream (an int, key array or RngStream), or a mapping
        of stream names to seeds.
      **rngs: seeds of the other streams, by name.

    Calling ``rngs()`` draws from ``default``; ``rngs.params()`` or ``rngs['params']()`` from
    ``params``. Unknown names fall back to ``default`` when it exists, otherwise raise
    ``AttributeError`` (``KeyError`` for ``rngs[name]``).

    Example:
      >>> from refax._rngs import Rngs
      >>> rngs = Rngs(0, params=1)
      >>> sorted(rngs)
      ['default', 'params']
      >>> rngs.dropout is rngs.default  # fallback
      True
      >>> x = rngs.params.normal((2, 3))
      >>> int(rngs.params.count[...])
      1
      >>> forked = rngs.fork()
      >>> forked.params.count[...], forked.params.key.shape
      (Array(0, dtype=uint32), ())
      >>> rngs.split(4).default.key.shape
      (4,)
    """

    def __init__(
        self,
        default: int | jax.Array | RngStream | Mapping[str, Any] | None = None,
        **rngs: int | jax.Array | RngStream,
    ):
        if default is not None:
            if isinstance(default, Mapping):
                rngs = {**default, **rngs}
            else:
                rngs["default"] = default
        for tag, seed in rngs.items():
            if not isinstance(tag, str) or tag.startswith("_"):
                raise ValueError(f"Invalid stream name {tag!r}: use a str not starting with '_'.")
            if isinstance(seed, RngStream):
                seed = seed.key.get_value()
            setattr(self, tag, RngStream(seed, tag=tag))

    # -- stream access -----------------------------------------------------------------------
    def _get_stream(self, name: str, error: type[Exception]) -> RngStream:
        d = self.__dict__
        stream = d.get(name)
        if not isinstance(stream, RngStream):
            stream = d.get("default")
            if not isinstance(stream, RngStream):
                raise error(
                    f"No RngStream named {name!r} found in Rngs (available streams: "
                    f"{sorted(self)}) and there is no 'default' stream to fall back to."
                )
        return stream

    def __getattr__(self, name: str) -> RngStream:
        # Only reached when normal lookup fails; private and dunder names never fall back.
        if name.startswith("_"):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return self._get_stream(name, AttributeError)

    def __getitem__(self, name: str) -> RngStream:
        return self._get_stream(name, KeyError)

    def __call__(self) -> jax.Array:
        """Draws a key from the ``default`` stream."""
        return self._get_stream("default", AttributeError)()

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.items())

    def __len__(self) -> int:
        return sum(1 for _ in self.items())

    def __contains__(self, name: Any) -> bool:
        return isinstance(self.__dict__.get(name), RngStream)

    def items(self) -> Iterator[tuple[str, RngStream]]:
        """Yields ``(name, stream)`` pairs in creation order."""
        for name, value in list(self.__dict__.items()):
            if isinstance(value, RngStream):
                yield name, value

    # -- derived Rngs --------------------------------------------------------------------------
    def _derive(self, spec: Any, missing: Any, make: Callable[[RngStream, Any], Any]) -> Rngs:
        rules = _per_stream(spec)
        seeds: dict[str, Any] = {}
        for name, stream in self.items():
            value = _lookup(rules, stream, missing)
            seeds[name] = stream if value is _KEEP else make(stream, value)
        return Rngs(**seeds)

    def split(self, k: Shape | Mapping[Any, Shape | None]) -> Rngs:
        """Returns a new Rngs whose streams hold batches of keys of shape ``k``.

        ``k`` may map filters (stream names, ``...``) to shapes; ``None`` or no match keeps a
        stream's key unsplit (its counter restarts at 0).
        """
        return self._derive(
            k,
            _KEEP,
            lambda s, v: s if v is None else s.split(v),  # type: ignore[arg-type]
        )

    def broadcast(self, k: Shape | Mapping[Any, Shape | None] | None) -> Rngs:
        """Returns a new Rngs whose streams hold one new key per stream repeated to shape ``k``.

        Accepts the same filter mappings as :meth:`split`.
        """
        return self._derive(k, _KEEP, lambda s, v: s if v is None else s.broadcast(v))

    def fork(self, /, *, split: Shape | Mapping[Any, Shape | None] | None = None) -> Rngs:
        """Returns a new Rngs with new independent keys (one key drawn from each stream).

        ``split`` splits the new keys of the selected streams: ``fork(split=5)`` is how the
        spec's guides make a batch of keys for ``nnx.vmap`` (the same as :meth:`split`, which
        the reference now prefers; refax keeps the documented spelling without a warning).
        """
        spec = {} if split is None else split

        def fork_one(stream: RngStream, value: Any) -> RngStream:
            return stream.fork(split=value)

        return self._derive(spec, None, fork_one)


# -- graph-wide functions ----------------------------------------------------------------------
StreamBackup = tuple  # (stream, key) or (stream, key, count)


class SplitBackups:
    """The stream states saved by ``split_rngs`` / ``fork_rngs`` before they changed them.

    Iterating gives ``(stream, key, count)`` tuples (``(stream, key)`` from
    :func:`backup_keys`); :func:`restore_rngs` puts them back, and so does leaving a ``with``
    block (even on an exception). Immutable, and a JAX pytree whose leaves are the streams'
    and the saved arrays.

    Args:
      backups: the ``(stream, key[, count])`` tuples.

    Example:
      >>> from refax import nnx
      >>> rngs = nnx.Rngs(0)
      >>> with nnx.split_rngs(rngs, splits=4) as backups:
      ...   rngs.default.key.shape, len(backups)
      ((4,), 1)
      >>> rngs.default.key.shape
      ()
    """

    __slots__ = ("backups",)

    def __init__(self, backups: Iterable[StreamBackup] = ()):
        object.__setattr__(self, "backups", list(backups))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"SplitBackups is immutable (cannot set {name!r}).")

    def __iter__(self) -> Iterator[StreamBackup]:
        return iter(self.backups)

    def __len__(self) -> int:
        return len(self.backups)

    def __enter__(self) -> SplitBackups:
        return self

    def __exit__(self, *exc: Any) -> None:
        restore_rngs(self)

    def __repr__(self) -> str:
        names = ", ".join(repr(b[0].tag) for b in self.backups)
        return f"SplitBackups(streams=[{names}])"


jax.tree_util.register_pytree_node(
    SplitBackups,
    lambda b: ((b.backups,), None),
    lambda _, children: SplitBackups(children[0]),
)


def _streams(node: Any, graph: bool | None) -> Iterator[tuple[tuple, RngStream]]:
    for path, value in iter_graph(node, graph=graph):
        if isinstance(value, RngStream):
            yield path, value


def backup_keys(node: Any, /, *, graph: bool | None = None) -> list[StreamBackup]:
    """Returns ``(stream, key)`` for every RngStream in ``node`` (see :func:`restore_rngs`)."""
    return [(stream, stream.key[...]) for _, stream in _streams(node, graph)]


def restore_rngs(backups: Iterable[StreamBackup], /) -> None:
    """Restores the keys (and counts, for 3-tuples) recorded in ``backups``.

    Backups are applied last to first, so a stream saved twice ends in its oldest state.
    """
    for backup in reversed(list(backups)):
        stream = backup[0]
        stream.key.set_value(backup[1])
        if len(backup) == 3:
            stream.count.set_value(backup[2])


def _scalars_only(path: tuple, key: jax.Array, target_shape: tuple[int, ...]) -> jax.Array:
    if target_shape != ():
        raise ValueError(
            f"Cannot reseed the stream at path {path!r}: its key is not a scalar (shape "
            f"{target_shape}). Pass policy='match_shape' to split the new key to that shape, "
            "or a custom policy callable."
        )
    return key


def _match_shape(path: tuple, key: jax.Array, target_shape: tuple[int, ...]) -> jax.Array:
    return key if target_shape == () else jax.random.split(key, target_shape)


_POLICIES = {"scalars_only": _scalars_only, "match_shape": _match_shape}


def reseed(
    node: Any,
    /,
    *,
    graph: bool | None = None,
    policy: str | Callable[[tuple, jax.Array, tuple[int, ...]], jax.Array] = "scalars_only",
    **stream_keys: int | jax.Array,
) -> None:
    """Resets the keys (and zeroes the counts) of the named streams anywhere inside ``node``.

    For each stream whose tag is in ``stream_keys`` a new key is drawn from a fresh
    ``Rngs(**stream_keys)``, so reseeding with the same seeds reproduces the same randomness.

    Args:
      node: any graph node (Module, Rngs, containers of them).
      graph: graph mode (default from the global setting) or tree mode.
      policy: what to do with non-scalar (batched) keys: ``'scalars_only'`` raises,
        ``'match_shape'`` splits the new key to the target shape, or a callable
        ``(path, scalar_key, target_shape) -> key``.
      **stream_keys: new seed (int or key) per stream name.

    Example:
      >>> from refax._rngs import Rngs, reseed
      >>> rngs = Rngs(params=0, dropout=1)
      >>> a = rngs.dropout.uniform()
      >>> reseed(rngs, dropout=1)
      >>> b = rngs.dropout.uniform()
      >>> reseed(rngs, dropout=1)
      >>> bool(rngs.dropout.uniform() == b), int(rngs.params.count[...])
      (True, 0)
    """
    policy_fn = _POLICIES.get(policy) if isinstance(policy, str) else policy
    if not callable(policy_fn):
        raise ValueError(
            f"policy must be 'scalars_only', 'match_shape' or a callable, got {policy!r}."
        )
    fresh = Rngs(**stream_keys)
    for path, stream in _streams(node, graph):
        tag = stream.key.get_metadata("tag", stream.tag)
        if tag in stream_keys:
            key = policy_fn(path, fresh[tag](), tuple(stream.key.shape))
            stream.key.set_value(key)
            stream.count.set_value(jnp.zeros(key.shape, dtype=jnp.uint32))
