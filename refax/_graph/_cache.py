"""The walk cache: a repeated walk of an unchanged graph costs a check, not a walk.

A kept walk is reused only when a fresh walk would produce the same result. A walk is a
function of what it reads; its ``Witness`` records that, and a lookup checks it (the
invariant, and how each way of changing an object is seen, are in README.md):

* the identity and type of every Object walked, and every value in its ``__dict__`` in order
  (identity). A walk puts refax's bookkeeping entry last in the ``__dict__`` of an object no
  walk has seen before, and never reorders one after that; a key added later by any route
  lands after the entry, so adding, deleting, renaming or replacing an attribute changes this
  sequence. Where the entry is not last, the keys themselves are compared too;
* the items of every list and dict walked (identity), and for every other mutable registered
  pytree its one-level flattening (treedef, so keys and static fields, and children);
* the type of every leaf, and the global structure epoch, which refax bumps when metadata
  outside any ``__dict__`` changes (Variable metadata and types, ``nnx.data``/``nnx.static``
  marks).

Entries live on a root object (``ObjectState.walks``), so they die with it: the cache never
keeps a model alive. They never point back to the object that holds them (the holder is a root
that no other node reaches, so no reference cycle is made), and they hold the other roots of a
joint walk only weakly: when one of those dies, the entry is dropped at once, so a long-lived
model walked with a fresh argument each call keeps no old argument alive.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections.abc import Sequence
from typing import Any

from refax import _filters
from refax._graph._flatten import FlattenResult, tree_children
from refax._object import _STATE_ATTR, Pytree
from refax._tracers import EPOCH, bump_epoch
from refax._variables import Variable

_MAX_PER_OBJECT = 8
_END = object()  # closes the value sequence, so a longer or shorter one never matches
_SEEN = object()  # marks a key walked once (cached from its second walk on)
_STRUCTURAL_FILTER_TYPES = (
    _filters.OfType,
    _filters.WithTag,
    _filters.PathContains,
    _filters.PathIn,
    _filters.Everything,
    _filters.Nothing,
)
_is = operator.is_
_chain = itertools.chain
_chain_all = itertools.chain.from_iterable
_values = dict.values


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


def filters_key(filters: tuple) -> tuple | None:
    """The cache key part for a walk with ``filters``, or None when it must not be cached."""
    if not all(_structural(f) for f in filters):
        return None
    try:
        key = tuple(_freeze(f) for f in filters)
        hash(key)
    except TypeError:  # pragma: no cover - unhashable filter objects
        return None
    return key


class Entry:
    """A kept walk and what it read (see the module docs)."""

    __slots__ = (
        "result",
        "epoch",
        "objs",
        "types",
        "vals",
        "leaf_types",
        "lists",
        "list_lens",
        "list_items",
        "dicts",
        "dict_lens",
        "dict_keys",
        "dict_values",
        "trees",
        "keyed",
        "root_checks",
        "leaf_slots",
        "root_leaf_types",
        "others",
        "extra",
        "holder",
        "key",
        "__weakref__",
    )

    def valid(self, roots: tuple) -> bool:
        """True when a walk of ``roots`` now would read exactly what this walk read."""
        if self.epoch != EPOCH.value:
            return False
        for i, ref in self.others:
            if ref() is not roots[i]:
                return False
        if not _check.witness_is(
            roots,
            self.root_checks,
            self.objs,
            self.types,
            self.vals,
            len(self.vals) - 1,
            self.result.leaves,
            self.leaf_types,
            self.lists,
            self.list_lens,
            self.list_items,
            self.dicts,
            self.dict_lens,
            self.dict_keys,
            self.dict_values,
        ):
            return False
        for pos, keys in self.keyed:
            if tuple(vars(self.objs[pos])) != keys:
                return False
        for pos, i in self.leaf_slots:  # Variables passed as arguments
            if type(roots[i]) is not self.root_leaf_types[pos]:
                return False
        for tree, treedef, children in self.trees:
            try:
                now_def, _, now_children = tree_children(tree)
            except Exception:
                return False
            if now_def != treedef or not all(map(_is, now_children, children)):
                return False
            if len(now_children) != len(children):
                return False
        return True

    def leaves(self, roots: tuple) -> list[Any]:
        leaves = self.result.leaves
        if self.leaf_slots:
            leaves = list(leaves)
            for pos, i in self.leaf_slots:
                leaves[pos] = roots[i]
        return leaves


class _PyCheck:
    """The witness comparisons ``Entry.valid`` makes, in Python: the same answers as the C
    module ``_fastcheck`` (built with the package when a compiler is there), which compares
    dict keys by identity where these compare them by equality (so it can only miss more)."""

    @staticmethod
    def types_are(xs: Sequence[Any], types: tuple) -> bool:
        return tuple(map(type, xs)) == types

    @staticmethod
    def values_are(objs: tuple, expected: tuple, n: int) -> bool:
        """The values are ``expected[:n]``; ``expected[n]`` is ``_END``, closing them."""
        now = _chain(_chain_all(map(_values, map(vars, objs))), (_END,))
        return all(map(_is, now, expected))

    @staticmethod
    def roots_are(roots: tuple, checks: tuple) -> bool:
        for i, cls, keys, p, vals in checks:
            root = roots[i]
            if type(root) is not cls:
                return False
            d = vars(root)
            if tuple(d) != keys:
                return False
            now = tuple(d.values())  # but for refax's entry, at ``p``
            if not all(map(_is, now[:p] + now[p + 1 :], vals)):
                return False
        return True

    @staticmethod
    def items_are(dicts: tuple, lens: tuple, keys: tuple, values: tuple) -> bool:
        if tuple(map(len, dicts)) != lens:
            return False
        if tuple(_chain_all(dicts)) != keys:
            return False
        return all(map(_is, _chain_all(map(_values, dicts)), values))

    @staticmethod
    def list_items_are(lists: tuple, lens: tuple, items: tuple) -> bool:
        if tuple(map(len, lists)) != lens:
            return False
        return all(map(_is, _chain_all(lists), items))

    @classmethod
    def witness_is(
        cls,
        roots: tuple,
        root_checks: tuple,
        objs: tuple,
        types: tuple,
        vals: tuple,
        n: int,
        leaves: Sequence[Any],
        leaf_types: tuple,
        lists: tuple,
        list_lens: tuple,
        list_items: tuple,
        dicts: tuple,
        dict_lens: tuple,
        dict_keys: tuple,
        dict_values: tuple,
    ) -> bool:
        """All of the above, as ``Entry.valid`` makes them (empty groups are skipped)."""
        return (
            cls.roots_are(roots, root_checks)
            and (not objs or (cls.types_are(objs, types) and cls.values_are(objs, vals, n)))
            and cls.types_are(leaves, leaf_types)
            and (not lists or cls.list_items_are(lists, list_lens, list_items))
            and (not dicts or cls.items_are(dicts, dict_lens, dict_keys, dict_values))
        )


try:
    from refax._graph import _fastcheck as _C_CHECK  # type: ignore[attr-defined]
except ImportError:  # not built (no compiler at install time): the Python version
    _C_CHECK = None
_check: Any = _C_CHECK if _C_CHECK is not None else _PyCheck


def _walks(holder: Any) -> dict | None:
    st = holder.__dict__.get(_STATE_ATTR) if isinstance(holder, Pytree) else None
    if st is None:
        return None
    walks = st.walks
    if walks is None:
        walks = st.walks = {}
    return walks


def lookup(roots: tuple, key: tuple) -> Entry | None:
    """The valid entry kept for walking ``roots`` with ``key``, or None."""
    for root in roots:
        st = root.__dict__.get(_STATE_ATTR) if isinstance(root, Pytree) else None
        if st is None or not st.walks:
            continue
        walks = st.walks
        entry = walks.get(key)
        if entry is None or entry is _SEEN:
            continue
        if entry.valid(roots):
            return entry
        walks.pop(key, None)  # (``walks`` may have been dropped by another thread meanwhile)
        return None
    return None


def still_kept(entry: Entry, roots: tuple) -> bool:
    """True when ``entry``, returned by an earlier :func:`lookup` or :func:`store` for
    ``roots``' key, is still kept by the same holder and valid for ``roots``: what
    ``lookup(roots, key) is entry`` would say, without building the key or searching the
    roots (a caller that keeps a weak reference to the entry of its last call)."""
    root = roots[entry.holder] if len(roots) > entry.holder else None
    st = root.__dict__.get(_STATE_ATTR) if isinstance(root, Pytree) else None
    walks = st.walks if st is not None else None
    # the holder's identity: the entry lives in the ``walks`` of the object it was made for
    if not walks or walks.get(entry.key) is not entry:
        return False
    if entry.valid(roots):
        return True
    walks.pop(entry.key, None)
    return False


def seen_before(roots: tuple, key: tuple) -> bool:
    """True if ``roots`` were walked with ``key`` before; otherwise remembers that they were.

    Walks are kept from the second one on: a one-off ``split`` hands its fresh state dicts to
    the caller instead of paying for a copy that a kept entry would need.
    """
    holder = next((r for r in roots if isinstance(r, Pytree)), None)
    walks = _walks(holder) if holder is not None else None
    if walks is None:
        return False
    if key in walks:
        return True
    _insert(walks, key, _SEEN)
    return False


def store(
    roots: tuple,
    key: tuple,
    result: FlattenResult,
    epoch: int,
    root_nodes: tuple[int, ...],
    kept: FlattenResult,
    extra: Any = None,
) -> Entry | None:
    """Keeps ``result`` (the walk of ``roots``, started at structure epoch ``epoch``) and
    returns its entry (None when the walk cannot be kept).

    Args:
      roots: the argument objects of the walk.
      key: what the walk was asked (filters, transform).
      result: the walk.
      epoch: ``EPOCH.value`` read before the walk started.
      root_nodes: the node index of each root in the walk.
      kept: what to keep of ``result`` (its ``nodes`` and ``leaves`` lists are edited in
        place: roots are replaced by None and put back on lookup).
      extra: anything the caller wants back with the entry (``Entry.extra``).
    """
    witness = result.witness
    if witness is None or not witness.cacheable:
        return None
    holder = _holder(roots, root_nodes, result.ref_targets)
    if holder is None:
        return None
    walks = _walks(roots[holder])
    entry = Entry()
    entry.holder = holder
    entry.key = key
    entry.result = kept
    entry.extra = extra
    entry.epoch = epoch
    # The roots are checked against the arguments of each lookup (their keys, and their values
    # but for their bookkeeping entry: the holder's would point back to this entry); every
    # other Object by the identity of its values, in one pass.
    root_ids = {id(r): i for i, r in enumerate(roots)}
    others, vals, keyed, root_checks = [], [], [], []
    keyed_at = dict(witness.keyed)
    for pos, (obj, obj_vals) in enumerate(zip(witness.objs, witness.vals)):
        i = root_ids.get(id(obj))
        if i is not None:
            keys = keyed_at.get(pos) or tuple(vars(obj))
            p = keys.index(_STATE_ATTR)
            root_checks.append((i, type(obj), keys, p, obj_vals[:p] + obj_vals[p + 1 :]))
            continue
        if pos in keyed_at:
            keyed.append((len(others), keyed_at[pos]))
        others.append(obj)
        vals.append(obj_vals)
    entry.root_checks = tuple(root_checks)
    entry.keyed = tuple(keyed)
    entry.objs = tuple(others)
    entry.types = tuple(map(type, others))
    entry.vals = (*_chain_all(vals), _END)
    leaf_slots = []
    root_leaf_types = {}
    leaf_pos = {id(v): i for i, v in enumerate(result.leaves) if isinstance(v, Variable)}
    for i, r in enumerate(roots):
        if isinstance(r, Variable) and id(r) in leaf_pos:
            leaf_slots.append((leaf_pos[id(r)], i))
            root_leaf_types[leaf_pos[id(r)]] = type(r)
            kept.leaves[leaf_pos[id(r)]] = None
    entry.leaf_slots = tuple(leaf_slots)
    entry.root_leaf_types = root_leaf_types
    entry.leaf_types = tuple(map(type, kept.leaves))
    if kept.nodes is not None:
        for idx in root_nodes:
            kept.nodes[idx] = None
    entry.lists = tuple(c for c, _ in witness.lists)
    entry.list_lens = tuple(len(items) for _, items in witness.lists)
    entry.list_items = tuple(_chain_all(items for _, items in witness.lists))
    entry.dicts = tuple(c for c, _, _ in witness.dicts)
    entry.dict_lens = tuple(len(keys) for _, keys, _ in witness.dicts)
    entry.dict_keys = tuple(_chain_all(keys for _, keys, _ in witness.dicts))
    entry.dict_values = tuple(_chain_all(values for _, _, values in witness.dicts))
    entry.trees = tuple(witness.trees)
    evict = _Evict(weakref.ref(roots[holder]), key)
    entry.others = tuple((i, weakref.ref(r, evict)) for i, r in enumerate(roots) if i != holder)
    _insert(walks, key, entry)
    return entry


def _holder(roots: tuple, root_nodes: tuple[int, ...], ref_targets: frozenset) -> int | None:
    """Which root keeps the entry: one that no node of the walk points to (so the entry,
    which holds the walk's nodes, makes no reference cycle through it); when every root is
    pointed to (the graph is cyclic anyway), the first Object."""
    first = None
    for i, (root, idx) in enumerate(zip(roots, root_nodes)):
        if not isinstance(root, Pytree):
            continue
        if first is None:
            first = i
        if idx not in ref_targets:
            return i
    return first


class _Evict:
    """Weakref callback of an entry's other roots: drops the entry from its holder's cache.

    It holds the holder weakly and the entry not at all, so it makes no reference cycle.
    """

    __slots__ = ("holder", "key")

    def __init__(self, holder: weakref.ref, key: tuple):
        self.holder = holder
        self.key = key

    def __call__(self, _ref: Any) -> None:
        holder = self.holder()
        st = holder.__dict__.get(_STATE_ATTR) if holder is not None else None
        if st is not None and st.walks:
            st.walks.pop(self.key, None)


def _insert(walks: dict, key: tuple, entry: Any) -> None:
    if len(walks) >= _MAX_PER_OBJECT and key not in walks:
        try:
            walks.pop(next(iter(walks)), None)
        except (StopIteration, RuntimeError):  # emptied or resized by another thread
            pass
    walks[key] = entry


def clear(root: Any | None = None) -> None:
    """Drops the kept walks of ``root``; without a root, invalidates every kept walk."""
    if root is None:
        bump_epoch()
        return
    st = root.__dict__.get(_STATE_ATTR) if isinstance(root, Pytree) else None
    if st is not None:
        st.walks = None
