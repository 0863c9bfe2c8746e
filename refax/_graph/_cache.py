"""The flatten cache: repeated walks of an unchanged graph cost a dict copy, not a walk.

A walk's result stays valid while (1) the global structure epoch is unchanged (no tracked
Object had an attribute added, deleted or rebound and no Variable's metadata changed) and (2)
no mutable container seen by the walk was changed in place (checked by identity against a
snapshot). Variable *values* are read through the Variables themselves, so value changes never
invalidate.

Entries live on the root object itself (``ObjectState.walks``), so they die with it: the cache
never keeps a model alive. They hold no reference back to the root (no ``nodes`` list), so a
dropped model is freed by reference counting, without waiting for the cyclic collector.
"""

from __future__ import annotations

from typing import Any

from refax import _filters
from refax._graph._flatten import FlattenResult, snapshots_valid
from refax._object import Pytree
from refax._tracers import EPOCH, bump_epoch

_MAX_PER_OBJECT = 8
_STATE_ATTR = "_pytree__state"
_STRUCTURAL_FILTER_TYPES = (
    _filters.OfType,
    _filters.WithTag,
    _filters.PathContains,
    _filters.PathIn,
    _filters.Everything,
    _filters.Nothing,
)
_SEEN = object()  # marks a root walked once (cached from its second walk on)


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


def _freeze(f: Any) -> Any:
    if isinstance(f, (tuple, list)):
        return (type(f), tuple(_freeze(x) for x in f))
    return (type(f), f)


def cache_key(root: Any, filters: tuple) -> tuple | None:
    """The cache key for a walk, or None when the walk must not be cached."""
    if not isinstance(root, Pytree) or not all(_structural(f) for f in filters):
        return None
    try:
        key = tuple(_freeze(f) for f in filters)
        hash(key)
    except TypeError:  # pragma: no cover - unhashable filter objects
        return None
    return key


def _walks(root: Any) -> dict | None:
    st = root.__dict__.get(_STATE_ATTR)
    if st is None:
        return None
    walks = st.walks
    if walks is None:
        walks = st.walks = {}
    return walks


def lookup(key: tuple, root: Any) -> FlattenResult | None:
    walks = _walks(root)
    if walks is None:
        return None
    entry = walks.get(key)
    if entry is None or entry[1] is _SEEN:
        return None
    epoch, result = entry
    if epoch != EPOCH.value:
        return None
    if result.snapshots and not snapshots_valid(result.snapshots):
        walks.pop(key, None)
        return None
    return result


def seen_before(key: tuple, root: Any) -> bool:
    """True if ``root`` was walked before with these filters; otherwise remembers it.

    Walks are cached from the second one on: a one-off ``split`` then hands its fresh state
    dicts to the caller instead of paying for a copy that a cache entry would need.
    """
    walks = _walks(root)
    if walks is None:
        return False
    if key in walks:
        return True
    _insert(walks, key, (-1, _SEEN))
    return False


def store(key: tuple, root: Any, result: FlattenResult, epoch: int) -> None:
    walks = _walks(root)
    if walks is None:
        return
    kept = FlattenResult(result.graphdef, result.states, None, result.leaves, result.snapshots)
    kept.num_refs = result.num_refs
    _insert(walks, key, (epoch, kept))


def _insert(walks: dict, key: tuple, entry: tuple) -> None:
    if len(walks) >= _MAX_PER_OBJECT and key not in walks:
        walks.pop(next(iter(walks)), None)
    walks[key] = entry


def clear(root: Any | None = None) -> None:
    """Drops the cached walks of ``root``; without a root, invalidates every cached walk."""
    if root is None:
        bump_epoch()
        return
    st = root.__dict__.get(_STATE_ATTR) if isinstance(root, Pytree) else None
    if st is not None:
        st.walks = None
