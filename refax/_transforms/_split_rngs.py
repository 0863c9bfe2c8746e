"""Splitting random streams for vectorising transforms: ``split_rngs``, ``fork_rngs``,
``with_rngs``.

``nnx.vmap``/``nnx.scan`` give each lane one key when a stream holds a batch of keys. Rather
than creating Rngs from split keys, ``split_rngs(splits=n)`` splits the streams inside the
arguments right before the call (drawing one key from each stream and splitting it into ``n``)
and restores them afterwards, so the Rngs stay usable outside.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from refax import nnx
  >>> rngs = nnx.Rngs(noise=0)
  >>> @nnx.split_rngs(splits=3)
  ... @nnx.vmap
  ... def noise(rngs):
  ...   return jax.random.normal(rngs.noise(), ())
  >>> noise(rngs).shape, rngs.noise.key.shape
  ((3,), ())
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from refax._rngs import RngStream, SplitBackups, _streams

__all__ = ["split_rngs", "fork_rngs", "with_rngs"]

_MISSING = object()


def _matching(node: Any, only: Any, graph: bool | None) -> list[tuple[tuple, RngStream]]:
    from refax._filters import to_predicate

    pred = to_predicate(only)
    return [(p, s) for p, s in _streams(node, graph) if pred(p, s.key) or pred(p, s)]


def _apply(
    node: Any,
    splits: Any,
    only: Any,
    squeeze: bool,
    graph: bool | None,
    make_key: Callable[[RngStream, Any], Any],
) -> SplitBackups:
    backups = []
    seen: set[int] = set()
    for _, stream in _matching(node, only, graph):
        if id(stream) in seen:
            continue
        seen.add(id(stream))
        new_key = make_key(stream, splits)
        backups.append((stream, stream.key.get_value(), stream.count.get_value()))
        if squeeze and new_key.ndim and new_key.shape[0] == 1:
            new_key = new_key[0]
        stream.key.set_value(new_key)
        stream.count.set_value(jnp.zeros(new_key.shape, dtype=jnp.uint32))
    return SplitBackups(backups)


def _split_key(stream: RngStream, splits: Any) -> Any:
    return jax.random.split(stream(), splits)


def _fork_key(stream: RngStream, splits: Any) -> Any:
    key = stream()
    return key if splits is None else jax.random.split(key, splits)


def _decorate(
    fun: Callable[..., Any], splits: Any, only: Any, squeeze: bool, graph: Any, make: Callable
):
    @functools.wraps(fun)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _apply((args, kwargs), splits, only, squeeze, graph, make):
            return fun(*args, **kwargs)

    return wrapper


def split_rngs(
    node: Any = _MISSING,
    /,
    *,
    splits: int | tuple[int, ...],
    only: Any = ...,
    squeeze: bool = False,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Splits the keys of the RngStreams in ``node`` into ``splits`` keys each.

    Each matching stream draws one key (its count advances by one) and holds
    ``jax.random.split(key, splits)`` with zero counts until restored. Forms:

    * ``@nnx.split_rngs(splits=n)`` decorates a function: streams in its arguments are split
      for the call and restored afterwards (keeping the advanced count);
    * ``with nnx.split_rngs(node, splits=n): ...`` splits for the block;
    * ``backups = nnx.split_rngs(node, splits=n)`` splits now; ``nnx.restore_rngs(backups)``.

    Args:
      only: filter selecting the streams (by their key/count Variables' tags or paths).
      squeeze: drop a leading split dimension of size 1.
    """
    if node is _MISSING:
        return lambda f: _decorate(f, splits, only, squeeze, graph, _split_key)
    return _apply(node, splits, only, squeeze, graph, _split_key)


def fork_rngs(
    node: Any = _MISSING,
    /,
    *,
    split: Any = None,
    only: Any = ...,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Like :func:`split_rngs`, but forks streams to fresh keys (split only if ``split``)."""
    if node is _MISSING:
        return lambda f: _decorate(f, split, only, False, graph, _fork_key)
    return _apply(node, split, only, False, graph, _fork_key)


def with_rngs(
    node: Any = _MISSING,
    /,
    *,
    split: Any = None,
    fork: Any = None,
    broadcast: Any = None,
    graph: bool | None = None,
) -> Any:
    """Returns a copy of ``node`` whose streams are split / forked / broadcast by filter.

    Each of ``split``, ``fork``, ``broadcast`` maps filters to a shape (or is one shape for
    every stream). Also usable as a decorator applying to the function's arguments.
    """
    from refax._graph import clone

    def transform(tree: Any) -> Any:
        tree = clone(tree)
        for rule, make in ((split, _split_key), (fork, _fork_key), (broadcast, _broadcast)):
            if rule is None:
                continue
            items = rule.items() if isinstance(rule, dict) else [(..., rule)]
            for only, shape in items:
                _apply(tree, shape, only, False, graph, make)
        return tree

    if node is _MISSING:

        def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(f)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                args, kwargs = transform((args, kwargs))
                return f(*args, **kwargs)

            return wrapper

        return decorator
    return transform(node)


def _broadcast(stream: RngStream, shape: Any) -> Any:
    key = stream()
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return jnp.broadcast_to(key, shape + key.shape)
