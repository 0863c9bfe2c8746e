"""Splitting random streams for vectorising transforms: ``split_rngs``, ``fork_rngs``,
``with_rngs``.

``nnx.vmap``/``nnx.scan`` give each lane one key when a stream holds a batch of keys. Rather
than creating Rngs from split keys, ``split_rngs(splits=n)`` splits the streams inside the
arguments right before the call (drawing one key from each stream and splitting it into
``n``), so the Rngs stay usable outside. Two styles, chosen by the ``graph`` /
``graph_updates`` modes (their defaults come from ``nnx.set_graph_mode`` /
``nnx.set_graph_updates``, read at each call):

* **in place** (graph mode with graph updates, the default): the streams themselves are
  split; ``split_rngs(node, ...)`` returns :class:`~refax._rngs.SplitBackups` that restore
  them (``nnx.restore_rngs(backups)``, or leaving a ``with`` block). The decorator restores
  them when the function returns.
* **functional** (``graph_updates=False``, or tree mode): ``split_rngs(node, ...)`` returns a
  copy of ``node`` whose streams are split; the decorator calls the function with such
  copies. ``node`` keeps its keys (each split stream's count advances by one, since the new
  keys are drawn from it).

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
  >>> split = nnx.split_rngs(rngs, splits=5, graph_updates=False)
  >>> split.noise.key.shape, rngs.noise.key.shape
  ((5,), ())
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

from refax._config import resolve_modes
from refax._filters import to_predicate
from refax._graph import clone
from refax._rngs import RngStream, SplitBackups, _streams

__all__ = ["split_rngs", "fork_rngs", "with_rngs"]

_MISSING: Any = object()
Rules = list[tuple[Callable[[tuple, RngStream], bool], Any]]


def _stream_predicate(only: Any) -> Callable[[tuple, RngStream], bool]:
    pred = to_predicate(only)
    return lambda p, s: pred((*p, "key"), s.key) and pred((*p, "count"), s.count)


def _rules(spec: Any, default: Any) -> Rules:
    """``spec`` (one value, or a filter -> value mapping) as (predicate, value) pairs."""
    if spec is None:
        spec = {...: default}
    elif not isinstance(spec, Mapping):
        spec = {...: spec}
    return [(_stream_predicate(f), v) for f, v in spec.items()]


def _first(rules: Rules, path: tuple, stream: RngStream) -> Any:
    for pred, value in rules:
        if pred(path, stream):
            return (value,)
    return None


def _new_state(stream: RngStream, rule: Any, squeeze: bool, make_key: Callable) -> tuple:
    """``(key, count)`` for a stream matched by ``rule``: the key is drawn from ``stream``."""
    key = make_key(stream, rule)
    if squeeze:
        key = key[0]
    return key, jnp.zeros(key.shape, dtype=jnp.uint32)


def _in_place(node: Any, rules: Rules, squeeze: bool, make_key: Callable) -> SplitBackups:
    """Gives the matching streams of ``node`` new keys; returns what restores them."""
    backups = []
    seen: set[int] = set()
    for path, stream in list(_streams(node, True)):
        if id(stream) in seen:
            continue
        rule = _first(rules, path, stream)
        if rule is None:
            continue
        seen.add(id(stream))
        key, count = _new_state(stream, rule[0], squeeze, make_key)
        backups.append((stream, stream.key.get_value(), stream.count.get_value()))
        stream.key.set_value(key)
        stream.count.set_value(count)
    return SplitBackups(backups)


def _copied(node: Any, rules: Rules, squeeze: bool, graph: bool, make_key: Callable) -> Any:
    """A copy of ``node`` whose matching streams have new keys (drawn from ``node``'s)."""
    originals = list(_streams(node, graph))
    copy = clone(node, graph=graph)
    done: set[int] = set()
    for (path, stream), (_, target) in zip(originals, list(_streams(copy, graph))):
        if id(target) in done:
            continue
        rule = _first(rules, path, stream)
        if rule is None:
            continue
        done.add(id(target))
        key, count = _new_state(stream, rule[0], squeeze, make_key)
        target.key.set_value(key)
        target.count.set_value(count)
    return copy


def _apply(
    node: Any, rules: Rules, squeeze: bool, graph: Any, graph_updates: Any, make_key: Callable
) -> Any:
    g, u = resolve_modes(graph, graph_updates)
    if u:
        return _in_place(node, rules, squeeze, make_key)
    return _copied(node, rules, squeeze, g, make_key)


def _decorator(rules: Rules, squeeze: bool, graph: Any, graph_updates: Any, make_key: Callable):
    def decorate(fun: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fun)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            g, u = resolve_modes(graph, graph_updates)
            if u:
                with _in_place((args, kwargs), rules, squeeze, make_key):
                    return fun(*args, **kwargs)
            args, kwargs = _copied((args, kwargs), rules, squeeze, g, make_key)
            return fun(*args, **kwargs)

        return wrapper

    return decorate


def _split_key(stream: RngStream, splits: Any) -> Any:
    return jax.random.split(stream(), splits)


def _fork_key(stream: RngStream, splits: Any) -> Any:
    key = stream()
    return key if splits is None else jax.random.split(key, splits)


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

    Each matching stream draws one key (its count advances by one); the split streams hold
    ``jax.random.split(key, splits)`` with zero counts of the same shape. Forms:

    * ``@nnx.split_rngs(splits=n)`` decorates a function: the streams in its arguments are
      split for the call (in place and restored afterwards, or in copies: see the modes);
    * ``with nnx.split_rngs(node, splits=n): ...`` splits in place for the block;
    * ``backups = nnx.split_rngs(node, splits=n)`` splits in place now;
      ``nnx.restore_rngs(backups)`` undoes it;
    * ``new = nnx.split_rngs(node, splits=n, graph_updates=False)`` returns a split copy.

    Args:
      node: the graph node (Module, Rngs, any container of them); omit it for a decorator.
      splits: the shape of the new batch of keys.
      only: filter selecting the streams (matched against their key and count Variables).
      squeeze: with ``splits=1``, drop the split dimension (one fresh key per stream).
      graph: graph mode (default: ``nnx.set_graph_mode``); tree mode always copies.
      graph_updates: split in place (default: ``nnx.set_graph_updates``) or in a copy.

    Returns:
      :class:`~refax._rngs.SplitBackups` (in place), a copy of ``node`` (functional), or a
      decorator (no ``node``).

    Raises:
      ValueError: ``squeeze=True`` with ``splits`` other than 1.

    Example:
      >>> from refax import nnx
      >>> rngs = nnx.Rngs(params=0, dropout=1)
      >>> backups = nnx.split_rngs(rngs, splits=4, only="params")
      >>> rngs.params.key.shape, rngs.dropout.key.shape
      ((4,), ())
      >>> nnx.restore_rngs(backups)
      >>> rngs.params.key.shape, int(rngs.params.count[...])
      ((), 1)
    """
    if squeeze and splits != 1:
        raise ValueError("split_rngs: squeeze=True is only supported for splits=1.")
    rules = [(_stream_predicate(only), splits)]
    if node is _MISSING:
        return _decorator(rules, squeeze, graph, graph_updates, _split_key)
    return _apply(node, rules, squeeze, graph, graph_updates, _split_key)


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

    Args:
      node: the graph node; omit it for a decorator.
      split: ``None`` (every stream gets one fresh key), a shape (split every fresh key),
        or a mapping filter -> shape or ``None`` (first matching filter wins; unmatched
        streams are left alone).
      only: filter restricting the streams considered.
      graph: graph mode (default: ``nnx.set_graph_mode``); tree mode always copies.
      graph_updates: fork in place (default: ``nnx.set_graph_updates``) or in a copy.

    Returns:
      :class:`~refax._rngs.SplitBackups` (in place), a copy of ``node`` (functional), or a
      decorator (no ``node``).

    Example:
      >>> from refax import nnx
      >>> rngs = nnx.Rngs(params=0)
      >>> forked = nnx.fork_rngs(rngs, split={"params": 2}, graph_updates=False)
      >>> forked.params.key.shape, rngs.params.key.shape
      ((2,), ())
    """
    rules = _rules(split, None)
    if only is not ...:
        only_pred = _stream_predicate(only)
        rules = [(lambda p, s, r=r: only_pred(p, s) and r(p, s), v) for r, v in rules]
    if node is _MISSING:
        return _decorator(rules, False, graph, graph_updates, _fork_key)
    return _apply(node, rules, False, graph, graph_updates, _fork_key)


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

    Prepares the random streams of a Module or ``Rngs`` for a vectorising transform
    without touching the original: the copy's matching streams hold a batch of keys
    (split), one fresh key repeated (broadcast) or one fresh key (fork). Streams matching no
    rule are copied unchanged. A stream matched by more than one rule uses split, then
    broadcast, then fork; matching two rules through specific (non ``...``) filters is an
    error. The original streams each draw one key per rule applied (their counts advance),
    since the fresh keys come from them.

    Args:
      node: the graph node (Module, Rngs, any container of them); omit it to use
        ``with_rngs(...)`` as a decorator that applies to the function's arguments.
      split: a shape for every stream, or a mapping filter -> shape (first match wins): the
        stream is replaced by ``stream.split(shape)`` (a batch of keys).
      fork: a filter or a sequence of filters: matching streams are replaced by
        ``stream.fork()`` (one fresh key).
      broadcast: like ``split``, replacing the stream by ``stream.broadcast(shape)`` (one
        fresh key repeated).
      only: filter restricting the streams considered (default: all).
      graph: graph mode for finding the streams (``False``: tree mode, shared references
        are an error); None reads ``nnx.set_graph_mode``.
      graph_updates: accepted for API compatibility but not used: ``with_rngs`` always
        returns a copy.

    Returns:
      The copy of ``node``, or a decorator when ``node`` is omitted.

    Raises:
      ValueError: a stream matched by several rules through specific filters.

    Example:
      >>> from refax import nnx
      >>> rngs = nnx.Rngs(params=0, dropout=1)
      >>> new = nnx.with_rngs(rngs, split={'params': 4}, fork='dropout')
      >>> new.params.key.shape, new.dropout.key.shape, rngs.params.key.shape
      ((4,), (), ())
      >>> int(rngs.params.count.value), int(rngs.dropout.count.value)
      (1, 1)
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
