"""Splitting random streams for vectorising transforms: ``split_rngs``, ``fork_rngs``,
``with_rngs``.

``nnx.vmap``/``nnx.scan`` give each lane one key when a stream holds a batch of keys. Rather
than creating Rngs from split keys, ``split_rngs(splits=n)`` splits the streams inside the
arguments right before the call (drawing one key from each stream and splitting it into ``n``)
and restores them afterwards, so the Rngs stay usable outside.

A filter (``only=``, the keys of a ``split`` mapping) selects a stream when it matches both the
stream's key Variable (at ``path + ('key',)``) and its count Variable (``path + ('count',)``):
stream names (``'dropout'``), ``nnx.RngState`` and path filters all work.

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
  >>> new = nnx.with_rngs(nnx.Rngs(params=0, dropout=1), split={'params': 4}, fork=...)
  >>> new.params.key.shape, new.dropout.key.shape
  ((4,), ())
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from refax._rngs import RngStream, SplitBackups, _streams

__all__ = ["split_rngs", "fork_rngs", "with_rngs"]

_MISSING = object()


def _stream_predicate(only: Any) -> Callable[[tuple, RngStream], bool]:
    from refax._filters import to_predicate

    pred = to_predicate(only)
    return lambda p, s: pred((*p, "key"), s.key) and pred((*p, "count"), s.count)


def _rules(spec: Any, default: Any) -> list[tuple[Callable[[tuple, RngStream], bool], Any]]:
    """``spec`` (one value, or a filter -> value mapping) as (predicate, value) pairs."""
    if spec is None:
        spec = {...: default}
    elif not isinstance(spec, Mapping):
        spec = {...: spec}
    return [(_stream_predicate(f), v) for f, v in spec.items()]


def _first(rules: list, path: tuple, stream: RngStream) -> Any:
    for pred, value in rules:
        if pred(path, stream):
            return (value,)
    return None


def _apply(
    node: Any,
    rules: list,
    squeeze: bool,
    graph: bool | None,
    make_key: Callable[[RngStream, Any], Any],
) -> SplitBackups:
    backups = []
    seen: set[int] = set()
    for path, stream in list(_streams(node, graph)):
        if id(stream) in seen:
            continue
        rule = _first(rules, path, stream)
        if rule is None:
            continue
        seen.add(id(stream))
        new_key = make_key(stream, rule[0])
        backups.append((stream, stream.key.get_value(), stream.count.get_value()))
        if squeeze:
            new_key = new_key[0]
        stream.key.set_value(new_key)
        stream.count.set_value(jnp.zeros(new_key.shape, dtype=jnp.uint32))
    return SplitBackups(backups)


def _split_key(stream: RngStream, splits: Any) -> Any:
    return jax.random.split(stream(), splits)


def _fork_key(stream: RngStream, splits: Any) -> Any:
    key = stream()
    return key if splits is None else jax.random.split(key, splits)


def _decorate(fun: Callable[..., Any], apply: Callable[[Any], SplitBackups]):
    @functools.wraps(fun)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with apply((args, kwargs)):
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
      only: filter selecting the streams (matched against their key and count Variables).
      squeeze: with ``splits=1``, drop the split dimension (one fresh key per stream).

    Raises:
      ValueError: ``squeeze=True`` with ``splits`` other than 1.
    """
    if squeeze and splits != 1:
        raise ValueError("split_rngs: squeeze=True is only supported for splits=1.")
    rules = [(_stream_predicate(only), splits)]
    apply = lambda tree: _apply(tree, rules, squeeze, graph, _split_key)  # noqa: E731
    if node is _MISSING:
        return lambda f: _decorate(f, apply)
    return apply(node)


def fork_rngs(
    node: Any = _MISSING,
    /,
    *,
    split: Any = None,
    only: Any = ...,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Like :func:`split_rngs`, but forks streams to fresh keys.

    ``split`` is ``None`` (every stream gets one fresh key), a shape (split every fresh key),
    or a mapping filter -> shape or ``None`` (first matching filter wins; unmatched streams
    are left alone). ``only`` restricts the streams considered.
    """
    rules = _rules(split, None)
    if only is not ...:
        only_pred = _stream_predicate(only)
        rules = [(lambda p, s, r=r: only_pred(p, s) and r(p, s), v) for r, v in rules]
    apply = lambda tree: _apply(tree, rules, False, graph, _fork_key)  # noqa: E731
    if node is _MISSING:
        return lambda f: _decorate(f, apply)
    return apply(node)


def with_rngs(
    node: Any = _MISSING,
    /,
    *,
    split: Any = None,
    fork: Any = None,
    broadcast: Any = None,
    only: Any = True,
    graph: bool | None = None,
    graph_updates: bool | None = None,
) -> Any:
    """Returns a copy of ``node`` whose streams are split, broadcast or forked.

    Args:
      split: a shape for every stream, or a mapping filter -> shape (first match wins): the
        stream is replaced by ``stream.split(shape)`` (a batch of keys).
      fork: a filter or a sequence of filters: matching streams are replaced by
        ``stream.fork()`` (one fresh key).
      broadcast: like ``split``, replacing the stream by ``stream.broadcast(shape)`` (one
        fresh key repeated).
      only: filter restricting the streams considered (default: all).

    Streams matching no rule are copied unchanged. A stream matched by more than one rule
    uses split, then broadcast, then fork; matching two rules through specific (non ``...``)
    filters is an error. The original streams each draw one key per rule applied (their
    counts advance), as the fresh keys come from them. Also usable as a decorator applying to
    the function's arguments.

    Raises:
      ValueError: a stream matched by several rules through specific filters.
    """
    split_rules = _named_rules(split)
    broadcast_rules = _named_rules(broadcast)
    if fork is None:
        forks: list = []
    elif isinstance(fork, str) or not isinstance(fork, Sequence):
        forks = [fork]
    else:
        forks = list(fork)
    fork_rules = [(f, _stream_predicate(f), None) for f in forks]
    only_pred = _stream_predicate(only)

    def transform(tree: Any) -> Any:
        from refax._graph import clone

        original = [(p, s) for p, s in _streams(tree, graph)]
        copy = clone(tree)
        for (path, stream), (_, target) in zip(original, list(_streams(copy, graph))):
            if not only_pred(path, stream):
                continue
            found = {}
            for kind, rules in (
                ("split", split_rules),
                ("broadcast", broadcast_rules),
                ("fork", fork_rules),
            ):
                for f, pred, value in rules:
                    if pred(path, stream):
                        found[kind] = (f, value)
                        break
            specific = [k for k, (f, _) in found.items() if f is not ... and f is not True]
            if len(found) > 1 and len(specific) > 1:
                lines = "\n".join(f"  - {k} matches filter {f!r}" for k, (f, _) in found.items())
                raise ValueError(f"RngStream at path {path} matches multiple rules:\n{lines}")
            if "split" in found:
                new = stream.split(found["split"][1])
            elif "broadcast" in found:
                new = stream.broadcast(found["broadcast"][1])
            elif "fork" in found:
                new = stream.fork()
            else:
                continue
            target.key.set_value(new.key.get_value())
            target.count.set_value(new.count.get_value())
        return copy

    if node is _MISSING:

        def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(f)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                args, kwargs = transform((args, kwargs))
                return f(*args, **kwargs)

            return wrapper

        return decorator
    return transform(node)


def _named_rules(spec: Any) -> list[tuple[Any, Callable[[tuple, RngStream], bool], Any]]:
    if spec is None:
        return []
    if not isinstance(spec, Mapping):
        spec = {...: spec}
    return [(f, _stream_predicate(f), v) for f, v in spec.items()]
