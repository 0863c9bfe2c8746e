"""Flattening nested mappings to ``{path: leaf}`` and back (the reference's ``nnx.traversals``).

A nested mapping (dicts of dicts, ``FrozenDict``, ``State``, any ``Mapping``) flattens to a
dict whose keys are paths: tuples of the keys on the way down, or strings joined by ``sep``.
Values that are not mappings are leaves. Empty mappings have no leaves and disappear, unless
``keep_empty_nodes=True`` marks them with the :data:`empty_node` sentinel, which
``unflatten_mapping`` turns back into ``{}``. Walks keep an explicit stack, so any depth works.

Example:
  >>> from refax.nnx import traversals
  >>> flat = traversals.flatten_mapping({'a': 1, 'b': {'c': 2, 'd': {}}})
  >>> flat
  {('a',): 1, ('b', 'c'): 2}
  >>> traversals.unflatten_mapping(flat)
  {'a': 1, 'b': {'c': 2}}
  >>> traversals.flatten_mapping({'b': {'c': 2}}, sep='/')
  {'b/c': 2}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = [
    "empty_node",
    "flatten_mapping",
    "flatten_to_sequence",
    "unflatten_mapping",
]

IsLeaf = Callable[[tuple[Any, ...], Mapping[Any, Any]], bool]


class _EmptyNode:
    """The type of :data:`empty_node` (one instance)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "empty_node"

    def __copy__(self) -> _EmptyNode:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _EmptyNode:
        return self

    def __reduce__(self) -> str:
        return "empty_node"


empty_node = _EmptyNode()
"""Stands for an empty mapping in a flat mapping made with ``keep_empty_nodes=True``."""


def _walk(
    xs: Mapping[Any, Any], is_leaf: IsLeaf | None, keep_empty_nodes: bool
) -> list[tuple[tuple[Any, ...], Any]]:
    """``(path, leaf)`` pairs of ``xs`` in depth-first, insertion order."""
    if not isinstance(xs, Mapping):
        raise TypeError(f"expected a Mapping, got {type(xs).__qualname__}.")
    out: list[tuple[tuple[Any, ...], Any]] = []
    if is_leaf is not None and is_leaf((), xs):
        return [((), xs)]
    stack = [((), iter(xs.items()))]
    while stack:
        prefix, items = stack[-1]
        for key, value in items:
            path = (*prefix, key)
            if isinstance(value, Mapping) and not (is_leaf is not None and is_leaf(path, value)):
                if len(value):
                    stack.append((path, iter(value.items())))
                    break
                if keep_empty_nodes:
                    out.append((path, empty_node))
                continue
            out.append((path, value))
        else:
            stack.pop()
    return out


def flatten_mapping(
    xs: Mapping[Any, Any],
    /,
    *,
    keep_empty_nodes: bool = False,
    is_leaf: IsLeaf | None = None,
    sep: str | None = None,
) -> dict[Any, Any]:
    """Flattens a nested mapping to ``{path: leaf}``.

    Args:
      xs: the nested mapping.
      keep_empty_nodes: keep each empty mapping, as :data:`empty_node` (an empty ``xs``
        still gives ``{}``).
      is_leaf: ``is_leaf(path, mapping)`` returning True keeps that mapping whole, as a leaf.
      sep: join the keys of each path with ``sep`` (they must be strings) instead of
        making tuples.

    Returns:
      A new dict from paths to leaves, in depth-first order.

    Raises:
      TypeError: ``xs`` is not a mapping.

    Example:
      >>> from refax.nnx import traversals
      >>> traversals.flatten_mapping({'a': {}, 'b': {'c': 1}}, keep_empty_nodes=True)
      {('a',): empty_node, ('b', 'c'): 1}
    """
    pairs = _walk(xs, is_leaf, keep_empty_nodes)
    if sep is None:
        return dict(pairs)
    return {sep.join(path): value for path, value in pairs}


def flatten_to_sequence(
    xs: Mapping[Any, Any], /, *, is_leaf: IsLeaf | None = None
) -> list[tuple[tuple[Any, ...], Any]]:
    """Like :func:`flatten_mapping`, as a list of ``(path, leaf)`` pairs (empty mappings
    dropped).

    Example:
      >>> from refax.nnx import traversals
      >>> traversals.flatten_to_sequence({'a': 1, 'b': {'c': 2}})
      [(('a',), 1), (('b', 'c'), 2)]
    """
    return _walk(xs, is_leaf, False)


def unflatten_mapping(
    xs: Mapping[Any, Any] | Iterable[tuple[Any, Any]], /, *, sep: str | None = None
) -> dict[Any, Any]:
    """Rebuilds the nested dict from a flat mapping (or ``(path, leaf)`` pairs).

    Args:
      xs: ``{path: leaf}`` as made by :func:`flatten_mapping`, or an iterable of pairs.
      sep: the separator the paths were joined with (paths are then strings).

    Returns:
      Nested dicts; :data:`empty_node` leaves become ``{}``.

    Raises:
      TypeError: ``xs`` is neither a mapping nor an iterable.

    Example:
      >>> from refax.nnx import traversals
      >>> traversals.unflatten_mapping({'a/b': 1, 'c': traversals.empty_node}, sep='/')
      {'a': {'b': 1}, 'c': {}}
    """
    if isinstance(xs, Mapping):
        pairs: Iterable[tuple[Any, Any]] = xs.items()
    elif isinstance(xs, Iterable):
        pairs = xs
    else:
        raise TypeError(f"expected a Mapping or an iterable of pairs, got {type(xs).__qualname__}.")
    result: dict[Any, Any] = {}
    for path, value in pairs:
        if sep is not None:
            path = path.split(sep)
        if value is empty_node:
            value = {}
        cursor = result
        for key in path[:-1]:
            cursor = cursor.setdefault(key, {})
        cursor[path[-1]] = value
    return result
