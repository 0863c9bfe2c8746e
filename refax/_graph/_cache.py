"""The flatten cache: repeated walks of an unchanged graph cost a dict copy, not a walk.

A walk's result stays valid while (1) the global structure epoch is unchanged (no tracked
Object had an attribute added, deleted or rebound and no Variable's metadata changed) and (2)
no list or dict seen by the walk was mutated in place (checked by identity against a snapshot).
Variable *values* are read through the Variables themselves, so value changes never invalidate.

Entries are keyed by the root's identity and the filters, hold the root by weak reference, and
are dropped when the root dies.
"""

from __future__ import annotations

import weakref
from typing import Any

from refax import _filters
from refax._graph._flatten import FlattenResult, snapshots_valid
from refax._object import Pytree
from refax._tracers import EPOCH

_MAX_ENTRIES = 256
_CACHE: dict[tuple, _Entry] = {}
_STRUCTURAL_FILTER_TYPES = (
    _filters.OfType,
    _filters.WithTag,
    _filters.PathContains,
    _filters.PathIn,
    _filters.Everything,
    _filters.Nothing,
)


class _Entry:
    __slots__ = ("ref", "epoch", "result", "__weakref__")

    def __init__(self, ref: Any, epoch: int, result: FlattenResult | None):
        self.ref = ref
        self.epoch = epoch
        self.result = result


def _structural(f: Any) -> bool:
    """Filters whose answer depends only on path and type, never on values (safe to cache)."""
    if f is None or f is Ellipsis or type(f) in (bool, str, type) or isinstance(f, type):
        return True
    if isinstance(f, (tuple, list)):
        return all(_structural(x) for x in f)
    if isinstance(f, _STRUCTURAL_FILTER_TYPES):
        return True
    if isinstance(f, (_filters.Any, _filters.All)):
        return all(_structural(p) for p in f.predicates)
    if isinstance(f, _filters.Not):
        return _structural(f.predicate)
    return False


def cache_key(root: Any, filters: tuple) -> tuple | None:
    """The cache key for a walk, or None when the walk must not be cached."""
    if not isinstance(root, Pytree) or not all(_structural(f) for f in filters):
        return None
    try:
        return (id(root), tuple((type(f), f) for f in filters))
    except TypeError:  # pragma: no cover - unhashable filters
        return None


def lookup(key: tuple, root: Any) -> FlattenResult | None:
    entry = _CACHE.get(key)
    if entry is None or entry.result is None:
        return None
    if entry.ref() is not root or entry.epoch != EPOCH.value:
        return None
    result = entry.result
    if result.snapshots and not snapshots_valid(result.snapshots):
        del _CACHE[key]
        return None
    return result


def seen_before(key: tuple, root: Any) -> bool:
    """True if ``root`` was walked before with these filters; otherwise remembers it.

    Walks are cached from the second one on: a one-off ``split`` then hands its fresh state
    dicts to the caller instead of paying for a copy that a cache entry would need.
    """
    entry = _CACHE.get(key)
    if entry is not None and entry.ref() is root:
        return True
    store(key, root, None, -1)
    return False


def store(key: tuple, root: Any, result: FlattenResult | None, epoch: int) -> None:
    if len(_CACHE) >= _MAX_ENTRIES:
        for k in list(_CACHE)[: _MAX_ENTRIES // 4]:
            del _CACHE[k]
    try:
        ref = weakref.ref(root, lambda _, k=key, c=_CACHE: c.pop(k, None))
    except TypeError:  # pragma: no cover - not weak-referenceable
        return
    _CACHE[key] = _Entry(ref, epoch, result)


def clear() -> None:
    """Drops every cached walk (tests use it to time first walks)."""
    _CACHE.clear()
