"""State: the nested mapping of Variables that ``split`` extracts from a module.

A :class:`State` is a mutable, nested mapping from keys (attribute names as ``str``, list
indices as ``int``) to leaves: :class:`~refax._variables.Variable` objects, raw arrays, or any
other value. Nested levels are stored as plain Python ``dict`` objects; reading a nested level
(``state['linear']`` or ``state.linear``) returns a ``State`` *view* over the same ``dict``, so
writes through the view reach the parent.

States are JAX pytrees: ``jax.jit``, ``jax.grad`` and ``jax.tree.map`` accept them directly.
The top level flattens into its sorted keys and the nested ``dict`` levels are handed to JAX as
they are, so the bulk of the flattening runs in JAX's C++ code. Key paths are the same as for a
nested ``dict`` (``DictKey`` per level, then the Variable's ``GetAttrKey('value')``).

A :class:`FlatState` is the flat view: a sequence of ``(path, leaf)`` pairs sorted by path.
Filters (see :mod:`refax._filters`) select leaves by type, tag or path: ``State.filter`` and
``State.split`` partition a State, ``State.merge`` puts the parts back together.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from refax._statelib import State
  >>> from refax._variables import BatchStat, Param
  >>> state = State({"linear": {"w": Param(jnp.ones(2)), "b": Param(jnp.zeros(2))},
  ...                "bn": {"mean": BatchStat(jnp.zeros(2))}})
  >>> state.linear.w
  Param( # 2 (8 B)
    value=Array([1., 1.], dtype=float32)
  )
  >>> params, rest = state.split(Param, ...)
  >>> sorted(params.linear), list(rest.bn)
  (['b', 'w'], ['mean'])
  >>> State.merge(params, rest) == state
  True
  >>> jax.tree.map(lambda x: x + 1, state).to_pure_dict()["linear"]["b"]
  Array([1., 1.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

from refax._filters import filters_to_predicates
from refax._variables import Variable
from refax.typing import Filter, Key, PathParts

__all__ = [
    "State",
    "FlatState",
    "to_flat_state",
    "from_flat_state",
    "to_pure_dict",
    "replace_by_pure_dict",
    "restore_int_paths",
    "filter_state",
    "split_state",
    "merge_state",
    "map_state",
    "diff",
]

S = TypeVar("S", bound="State")
_DictKey = jax.tree_util.DictKey
_FlatIndexKey = jax.tree_util.FlattenedIndexKey


class _hybridmethod:
    """Binds the instance when called on one and the class otherwise.

    ``State.merge(a, b)`` and ``a.merge(b)`` then mean the same thing.
    """

    def __init__(self, func: Callable[..., Any]):
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj: Any, cls: type) -> Callable[..., Any]:
        func = self.func
        if obj is None:
            return lambda *args, **kwargs: func(cls, *args, **kwargs)
        return lambda *args, **kwargs: func(type(obj), obj, *args, **kwargs)


class MissingPathError(KeyError, ValueError):
    """A path of a pure dict is absent from the State it is written into."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# -- plain-dict helpers ------------------------------------------------------------------------
def _clean(d: dict) -> dict:
    """Returns ``d`` with nested States/Mappings turned into dicts; ``d`` itself if unchanged."""
    new = None
    for k, v in d.items():
        if type(v) is dict:
            c = _clean(v)
        elif isinstance(v, State):
            c = v._mapping
        elif isinstance(v, Mapping) and not isinstance(v, Variable):
            c = _clean(dict(v))
        else:
            continue
        if c is not v:
            if new is None:
                new = dict(d)
            new[k] = c
    return d if new is None else new


def _as_dict(x: Mapping[Key, Any]) -> dict:
    if isinstance(x, State):
        return x._mapping
    return State(x)._mapping


def _mixed_key(k: Any) -> tuple:
    return (1, k) if isinstance(k, str) else (0, k)


def _sorted_keys(d: Mapping) -> list:
    try:
        return sorted(d)
    except TypeError:  # str and int keys side by side
        return sorted(d, key=_mixed_key)


def _flatten_sorted(d: dict, prefix: tuple, paths: list, leaves: list) -> None:
    for k in _sorted_keys(d):
        v = d[k]
        if type(v) is dict:
            _flatten_sorted(v, (*prefix, k), paths, leaves)
        else:
            paths.append((*prefix, k))
            leaves.append(v)


def _from_flat(items: Iterable[tuple[PathParts, Any]]) -> dict:
    root: dict = {}
    for path, value in items:
        if not path:
            raise ValueError("Cannot place a value at the empty path () of a State.")
        node = root
        for k in path[:-1]:
            child = node.get(k)
            if type(child) is not dict:
                child = node[k] = {}
            node = child
        if isinstance(value, State):
            value = value._mapping
        node[path[-1]] = value
    return root


def _copy_tree(d: dict) -> dict:
    """A copy of the dict structure of a nested state dict (leaves are shared); any depth."""
    out = dict(d)
    stack = [out]
    while stack:
        level = stack.pop()
        for k, v in level.items():
            if type(v) is dict:
                level[k] = v = dict(v)  # rebinding an existing key: no resize while iterating
                stack.append(v)
    return out


def _merge_into(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if type(v) is dict:
            cur = dst.get(k)
            if type(cur) is dict:
                _merge_into(cur, v)
            else:
                dst[k] = _copy_tree(v)
        else:
            dst[k] = v


def _map(f: Callable[[PathParts, Any], Any], d: dict, prefix: tuple) -> dict:
    out = {}
    for k, v in d.items():
        out[k] = _map(f, v, (*prefix, k)) if type(v) is dict else f((*prefix, k), v)
    return out


def _diff(a: dict, b: dict) -> dict:
    out = {}
    for k, v in a.items():
        if k not in b:
            out[k] = v
        elif type(v) is dict and type(b[k]) is dict:
            sub = _diff(v, b[k])
            if sub:
                out[k] = sub
    return out


def _split(d: dict, prefix: tuple, preds: tuple, rest: list) -> list:
    """One dict (or None when empty) per predicate; unmatched leaves go to ``rest``."""
    n = len(preds)
    outs: list = [None] * n
    for k, v in d.items():
        path = (*prefix, k)
        if type(v) is dict:
            for i, sub in enumerate(_split(v, path, preds, rest)):
                if sub is not None:
                    if outs[i] is None:
                        outs[i] = {}
                    outs[i][k] = sub
            continue
        for i in range(n):
            if preds[i](path, v):
                if outs[i] is None:
                    outs[i] = {}
                outs[i][k] = v
                break
        else:
            rest.append((path, v))
    return outs


def _predicates(filters: tuple) -> tuple:
    return filters_to_predicates(filters)


def _kind(v: Any) -> str:
    return "Array" if isinstance(v, jax.Array) else type(v).__name__


def _remainder_error(rest: list) -> ValueError:
    shown = ", ".join(f"{p} ({_kind(v)})" for p, v in rest[:10])
    more = f" and {len(rest) - 10} more" if len(rest) > 10 else ""
    return ValueError(
        f"Non-exhaustive filters, got a non-empty remainder: {shown}{more}.\n"
        "Use `...` as the last filter to collect all remaining elements."
    )


def _values_equal(a: Any, b: Any) -> bool:
    if a is b:
        return True
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    for x, y in zip(la, lb):
        if x is y:
            continue
        try:
            if hasattr(x, "shape") or hasattr(y, "shape"):
                if np.shape(x) != np.shape(y) or not np.array_equal(x, y):
                    return False
            elif not bool(x == y):
                return False
        except Exception:
            return False
    return True


def _leaf_equal(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Variable) or isinstance(b, Variable):
        return (
            type(a) is type(b)
            and a._frozen_metadata() == b._frozen_metadata()
            and _values_equal(a._raw_value, b._raw_value)
        )
    return _values_equal(a, b)


def _tree_equal(a: dict, b: dict) -> bool:
    if a is b:
        return True
    if a.keys() != b.keys():
        return False
    for k, x in a.items():
        y = b[k]
        if x is y:
            continue
        if type(x) is dict or type(y) is dict:
            if type(x) is not dict or type(y) is not dict or not _tree_equal(x, y):
                return False
        elif not _leaf_equal(x, y):
            return False
    return True


def _indent(text: str) -> str:
    return text.replace("\n", "\n  ")


def _repr_dict(d: dict) -> str:
    if not d:
        return "{}"
    items = []
    for k, v in d.items():
        r = _repr_dict(v) if type(v) is dict else repr(v)
        items.append(f"  {k!r}: {_indent(r)}")
    return "{\n" + ",\n".join(items) + "\n}"


# -- State -------------------------------------------------------------------------------------
class State(MutableMapping[Key, Any]):
    """A nested mapping of Variables (or other leaves) keyed by attribute names and indices.

    Args:
      mapping: a mapping, or an iterable of ``(key, value)`` pairs. Nested mappings (including
        States) become nested levels; the top level is copied, nested dicts are shared.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._statelib import State
      >>> from refax._variables import Param
      >>> state = State({"layers": {0: {"w": Param(jnp.zeros(2))}}})
      >>> state.layers[0].w[...] = jnp.ones(2)
      >>> state["layers"][0]["w"].get_value()
      Array([1., 1.], dtype=float32)
      >>> print(State({"b": Param(jnp.zeros(2))}))
      State({
        'b': Param( # 2 (8 B)
          value=Array([0., 0.], dtype=float32)
        )
      })
    """

    # ``_shared``: the nested dicts belong to someone else (a kept graph walk): the first
    # access that could change them copies them first (copy on write, see ``_own``)
    __slots__ = ("_mapping", "_shared")
    _mapping: dict

    def __init__(self, mapping: Mapping[Key, Any] | Iterable[tuple[Key, Any]] = (), /):
        if isinstance(mapping, State):
            d = dict(mapping._own())
        else:
            d = _clean(dict(mapping))
        _set_mapping(self, d)
        _set_shared(self, False)

    @classmethod
    def _from_dict_unsafe(cls: type[S], mapping: dict) -> S:
        """Wraps ``mapping`` (a clean nested dict) without copying or checking it."""
        state = object.__new__(cls)
        _set_mapping(state, mapping)
        _set_shared(state, False)
        return state

    @classmethod
    def _copy_on_write(cls: type[S], mapping: dict) -> S:
        """Wraps a nested dict that must not change (a kept walk's): it is copied on the first
        write, or the first time a nested level or ``raw_mapping`` is handed out."""
        state = object.__new__(cls)
        _set_mapping(state, mapping)
        _set_shared(state, True)
        return state

    def _own(self) -> dict:
        """The mapping, copied first if it is shared (see ``_copy_on_write``)."""
        if self._shared:
            _set_mapping(self, _copy_tree(self._mapping))
            _set_shared(self, False)
        return self._mapping

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register_state_pytree(cls)

    @property
    def raw_mapping(self) -> dict:
        """The underlying nested ``dict`` (not a copy)."""
        return self._own()

    # -- mapping protocol ------------------------------------------------------------------
    def __getitem__(self, key: Key) -> Any:
        v = self._mapping[key]
        if type(v) is dict:  # a view sharing the level: it may be written to
            return type(self)._from_dict_unsafe(self._own()[key])
        return v

    def __getattr__(self, name: str) -> Any:
        if name == "_mapping" or name.startswith("__"):
            raise AttributeError(name)
        try:
            v = self._mapping[name]
        except KeyError:
            raise AttributeError(
                f"State has no key {name!r}; available keys: {list(self._mapping)}"
            ) from None
        if type(v) is dict:
            return type(self)._from_dict_unsafe(self._own()[name])
        return v

    def __setitem__(self, key: Key, value: Any) -> None:
        if isinstance(value, State):
            value = value._mapping
        elif type(value) is dict:
            value = _clean(value)
        elif isinstance(value, Mapping) and not isinstance(value, Variable):
            value = _clean(dict(value))
        self._own()[key] = value

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_mapping":
            _set_mapping(self, value)
            _set_shared(self, False)
        else:
            self[name] = value

    def __delitem__(self, key: Key) -> None:
        del self._own()[key]

    def __delattr__(self, name: str) -> None:
        try:
            del self._own()[name]
        except KeyError:
            raise AttributeError(name) from None

    def __iter__(self) -> Iterator[Key]:
        return iter(self._mapping)

    def __len__(self) -> int:
        return len(self._mapping)

    def __contains__(self, key: object) -> bool:
        return key in self._mapping

    def keys(self):  # type: ignore[override]
        return self._mapping.keys()

    def __dir__(self) -> list[str]:
        return [*super().__dir__(), *(k for k in self._mapping if isinstance(k, str))]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, State):
            return _tree_equal(self._mapping, other._mapping)
        if isinstance(other, Mapping):
            return _tree_equal(self._mapping, State(other)._mapping)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __or__(self, other: Mapping[Key, Any]) -> State:
        if not other:
            return self
        return merge_state(self, other)

    def __ror__(self, other: Mapping[Key, Any]) -> State:
        return merge_state(other, self)

    def __sub__(self, other: Mapping[Key, Any]) -> State:
        return diff(self, other)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_repr_dict(self._mapping)})"

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        """Treescope (``nnx.display`` in a notebook) shows a State as its type wrapped around
        a foldable dict of its levels and leaves."""
        from treescope import repr_lib  # (a runtime dependency; imported when first shown)

        return repr_lib.render_dictionary_wrapper(type(self), self._mapping, path, subtree_renderer)

    def __reduce__(self):
        return (type(self)._from_dict_unsafe, (self._mapping,))

    def __copy__(self) -> State:
        return type(self)._from_dict_unsafe(dict(self._own()))

    # -- conversions -------------------------------------------------------------------------
    def flat_state(self) -> FlatState:
        """Returns the leaves as a :class:`FlatState` of ``(path, leaf)`` pairs sorted by path."""
        return to_flat_state(self)

    @classmethod
    def from_flat_path(
        cls: type[S], flat_state: Mapping[PathParts, Any] | Iterable[tuple[PathParts, Any]], /
    ) -> S:
        """Builds a nested State from ``{path: leaf}`` or ``(path, leaf)`` pairs.

        Example:
          >>> from refax._statelib import State
          >>> State.from_flat_path({("a", "b"): 1, ("c",): 2}) == State({"a": {"b": 1}, "c": 2})
          True
        """
        return from_flat_state(flat_state, cls=cls)

    from_flat_state = from_flat_path

    def to_pure_dict(self, extract_fn: Callable[[Any], Any] | None = None) -> dict:
        """Nested plain dicts with each Variable replaced by its value (or ``extract_fn(leaf)``).

        Example:
          >>> from refax._statelib import State
          >>> from refax._variables import Param
          >>> State({"w": Param(1.0), "n": {0: 2}}).to_pure_dict()
          {'w': 1.0, 'n': {0: 2}}
        """
        return to_pure_dict(self, extract_fn)

    def replace_by_pure_dict(
        self, pure_dict: Mapping[Any, Any], replace_fn: Callable[[Any, Any], Any] | None = None
    ) -> None:
        """Writes the values of ``pure_dict`` into this State; see :func:`replace_by_pure_dict`."""
        replace_by_pure_dict(self, pure_dict, replace_fn)

    # -- filtering ---------------------------------------------------------------------------
    def split(self, first: Filter, /, *filters: Filter) -> State | tuple[State, ...]:
        """Partitions the leaves: one State per filter, each leaf to the first filter matching.

        Raises:
          ValueError: if some leaf matches no filter (add ``...`` as the last filter).
        """
        return split_state(self, first, *filters)

    def filter(self, first: Filter, /, *filters: Filter) -> State | tuple[State, ...]:
        """Like :meth:`split`, but leaves matching no filter are dropped instead of an error."""
        return filter_state(self, first, *filters)

    @_hybridmethod
    def merge(cls, state: Mapping[Key, Any], /, *states: Mapping[Key, Any]) -> State:
        """Deep-merges States (later ones win); ``State.merge(a, b)`` or ``a.merge(b)``."""
        return merge_state(state, *states, cls=cls)

    def map(self, f: Callable[[PathParts, Any], Any]) -> State:
        """Returns a State of the same structure with every leaf ``x`` at ``path`` as
        ``f(path, x)``."""
        return map_state(f, self)


_set_mapping = State._mapping.__set__  # type: ignore[attr-defined]
_set_shared = State._shared.__set__  # type: ignore[attr-defined]


def _register_state_pytree(cls: type[State]) -> None:
    def flatten(s: State):
        m = s._mapping
        keys = tuple(sorted(m))
        return [m[k] for k in keys], keys

    def flatten_with_keys(s: State):
        m = s._mapping
        keys = tuple(sorted(m))
        return [(_DictKey(k), m[k]) for k in keys], keys

    def unflatten(keys: tuple, children: Iterable[Any]) -> State:
        return cls._from_dict_unsafe(dict(zip(keys, children)))

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)


_register_state_pytree(State)


# -- FlatState ---------------------------------------------------------------------------------
class FlatState(Sequence[tuple[PathParts, Any]]):
    """A sequence of ``(path, leaf)`` pairs sorted by path: the flat form of a :class:`State`.

    Args:
      items: ``(path, leaf)`` pairs.
      sort: sort ``items`` by path (pass False only when they are already sorted).

    Example:
      >>> from refax._statelib import FlatState, State
      >>> from refax._variables import BatchStat, Param
      >>> flat = State({"b": BatchStat(0.0), "a": {"w": Param(1.0)}}).flat_state()
      >>> flat.paths
      (('a', 'w'), ('b',))
      >>> params, stats = flat.split(Param, BatchStat)
      >>> [type(x).__name__ for x in params.leaves + stats.leaves]
      ['Param', 'BatchStat']
      >>> FlatState.merge(params, stats).to_nested_state() == flat.to_nested_state()
      True
    """

    __slots__ = ("_paths", "_leaves")

    def __init__(self, items: Iterable[tuple[PathParts, Any]] = (), /, *, sort: bool = True):
        items = list(items)
        if sort:
            try:
                items.sort(key=lambda kv: kv[0])
            except TypeError:  # str and int keys at the same level
                items.sort(key=lambda kv: tuple(map(_mixed_key, kv[0])))
        self._paths: tuple[PathParts, ...] = tuple(p for p, _ in items)
        self._leaves: list[Any] = [v for _, v in items]

    @classmethod
    def from_sorted_keys_values(cls, paths: Sequence[PathParts], leaves: Sequence[Any], /):
        """Builds a FlatState from parallel, already sorted, paths and leaves (no checks)."""
        flat = object.__new__(cls)
        flat._paths = tuple(paths)
        flat._leaves = list(leaves)
        return flat

    @property
    def paths(self) -> tuple[PathParts, ...]:
        return self._paths

    @property
    def leaves(self) -> list[Any]:
        return self._leaves

    def __getitem__(self, index: int | slice) -> tuple[PathParts, Any] | FlatState:
        if isinstance(index, slice):
            return FlatState.from_sorted_keys_values(self._paths[index], self._leaves[index])
        return self._paths[index], self._leaves[index]

    def __len__(self) -> int:
        return len(self._paths)

    def __iter__(self) -> Iterator[tuple[PathParts, Any]]:
        return iter(zip(self._paths, self._leaves))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FlatState):
            return NotImplemented
        return self._paths == other._paths and all(map(_leaf_equal, self._leaves, other._leaves))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if not self._paths:
            return "FlatState([])"
        rows = [f"  ({p!r}, {_indent(repr(v))})" for p, v in self]
        return "FlatState([\n" + ",\n".join(rows) + "\n])"

    def to_nested_state(self) -> State:
        """Returns the nested :class:`State` with these leaves."""
        return State._from_dict_unsafe(_from_flat(self))

    def _partition(self, filters: tuple, exhaustive: bool) -> list[FlatState]:
        preds = _predicates(filters)
        buckets: list[tuple[list, list]] = [([], []) for _ in preds]
        rest = []
        for path, leaf in zip(self._paths, self._leaves):
            for pred, (ps, ls) in zip(preds, buckets):
                if pred(path, leaf):
                    ps.append(path)
                    ls.append(leaf)
                    break
            else:
                rest.append((path, leaf))
        if exhaustive and rest:
            raise _remainder_error(rest)
        return [FlatState.from_sorted_keys_values(ps, ls) for ps, ls in buckets]

    def split(self, first: Filter, /, *filters: Filter) -> FlatState | tuple[FlatState, ...]:
        """Partitions the pairs by filters; raises ``ValueError`` if some pair matches none."""
        parts = self._partition((first, *filters), exhaustive=True)
        return parts[0] if not filters else tuple(parts)

    def filter(self, first: Filter, /, *filters: Filter) -> FlatState | tuple[FlatState, ...]:
        """Like :meth:`split`, dropping the pairs that match no filter."""
        parts = self._partition((first, *filters), exhaustive=False)
        return parts[0] if not filters else tuple(parts)

    @_hybridmethod
    def merge(
        cls, flat_state: Iterable[tuple[PathParts, Any]], /, *flat_states: Iterable
    ) -> FlatState:
        """Unites flat states (later ones win on equal paths), sorted by path."""
        merged: dict[PathParts, Any] = {}
        for fs in (flat_state, *flat_states):
            merged.update(fs)
        return cls(merged.items())


jax.tree_util.register_pytree_with_keys(
    FlatState,
    lambda fs: ([(_FlatIndexKey(i), x) for i, x in enumerate(fs._leaves)], fs._paths),
    lambda paths, leaves: FlatState.from_sorted_keys_values(paths, list(leaves)),
    lambda fs: (fs._leaves, fs._paths),
)


# -- module-level functions --------------------------------------------------------------------
def to_flat_state(state: Mapping[Key, Any]) -> FlatState:
    """Returns the ``(path, leaf)`` pairs of ``state`` sorted by path (nested dicts descended)."""
    paths: list = []
    leaves: list = []
    _flatten_sorted(_as_dict(state), (), paths, leaves)
    return FlatState.from_sorted_keys_values(paths, leaves)


def from_flat_state(
    flat_state: Mapping[PathParts, Any] | Iterable[tuple[PathParts, Any]],
    *,
    cls: type[S] = State,  # type: ignore[assignment]
) -> S:
    """Builds a nested State from ``{path: leaf}`` or ``(path, leaf)`` pairs."""
    items = flat_state.items() if isinstance(flat_state, Mapping) else flat_state
    return cls._from_dict_unsafe(_from_flat(items))


def to_pure_dict(
    state: Mapping[Key, Any], extract_fn: Callable[[Any], Any] | None = None
) -> dict[Key, Any]:
    """Returns nested plain dicts with each Variable replaced by ``get_value()``.

    Args:
      state: a State (or nested mapping).
      extract_fn: if given, called on every leaf instead to produce the pure value.
    """

    def convert(d: dict) -> dict:
        out = {}
        for k, v in d.items():
            if type(v) is dict:
                out[k] = convert(v)
            elif extract_fn is not None:
                out[k] = extract_fn(v)
            else:
                out[k] = v.get_value() if isinstance(v, Variable) else v
        return out

    return convert(_as_dict(state))


def restore_int_paths(pure_dict: Mapping[Any, Any]) -> dict[Key, Any]:
    """Turns digit-string keys back into ints at every level (``'0'`` -> ``0``).

    Serialization formats such as JSON or some checkpointers turn list indices into strings.

    Example:
      >>> from refax._statelib import restore_int_paths
      >>> restore_int_paths({"layers": {"0": {"w": 1}, "1b": 2}})
      {'layers': {0: {'w': 1}, '1b': 2}}
    """
    out: dict = {}
    for k, v in pure_dict.items():
        if isinstance(k, str) and k.isascii() and k.isdigit():
            k = int(k)
        if isinstance(v, Mapping) and not isinstance(v, Variable):
            v = restore_int_paths(v)
        out[k] = v
    return out


def replace_by_pure_dict(
    state: State,
    pure_dict: Mapping[Any, Any],
    replace_fn: Callable[[Any, Any], Any] | None = None,
) -> None:
    """Writes the values of ``pure_dict`` (as made by :func:`to_pure_dict`) into ``state``.

    Variables are updated in place with ``set_value``; other leaves are replaced. With
    ``replace_fn``, every targeted leaf ``x`` is replaced by ``replace_fn(x, value)`` instead.
    Keys ``'0'``, ``'1'``... also match int keys. Paths absent from ``pure_dict`` are left alone.

    Raises:
      MissingPathError: (a ``KeyError`` and ``ValueError``) if a path of ``pure_dict`` is not in
        ``state``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._statelib import State
      >>> from refax._variables import Param
      >>> w = Param(jnp.zeros(2))
      >>> state = State({"layers": {0: {"w": w}}})
      >>> state.replace_by_pure_dict({"layers": {"0": {"w": jnp.ones(2)}}})
      >>> w.get_value()
      Array([1., 1.], dtype=float32)
    """

    def write(target: dict, src: Mapping, prefix: tuple) -> None:
        for k, v in src.items():
            key = k
            if key not in target:
                if isinstance(k, str) and k.isascii() and k.isdigit() and int(k) in target:
                    key = int(k)
                elif isinstance(k, int) and str(k) in target:
                    key = str(k)
                else:
                    raise MissingPathError(
                        f"Path {(*prefix, k)} of the pure dict is not in the State; keys at "
                        f"{prefix or 'the top level'}: {list(target)}"
                    )
            cur = target[key]
            if type(cur) is dict:
                if not isinstance(v, Mapping):
                    raise ValueError(
                        f"Expected a mapping at path {(*prefix, key)} of the pure dict, since "
                        f"the State has a nested level there; got {type(v).__name__}."
                    )
                write(cur, v, (*prefix, key))
            elif replace_fn is not None:
                target[key] = replace_fn(cur, v)
            elif isinstance(cur, Variable):
                cur.set_value(v)
            else:
                target[key] = v

    write(state._own(), _as_dict(pure_dict) if isinstance(pure_dict, State) else pure_dict, ())


def _partition(state: Mapping[Key, Any], filters: tuple, exhaustive: bool) -> Any:
    rest: list = []
    outs = _split(_as_dict(state), (), _predicates(filters), rest)
    if exhaustive and rest:
        raise _remainder_error(rest)
    parts = [State._from_dict_unsafe({} if o is None else o) for o in outs]
    return parts[0] if len(parts) == 1 else tuple(parts)


def split_state(
    state: Mapping[Key, Any], first: Filter, /, *filters: Filter
) -> State | tuple[State, ...]:
    """Partitions ``state``: one State per filter, each leaf going to the first filter it
    matches. A single filter returns a State, several a tuple.

    Raises:
      ValueError: if some leaf matches no filter; add ``...`` as the last filter to catch
        the rest.

    Example:
      >>> from refax._statelib import State, split_state
      >>> from refax._variables import BatchStat, Param
      >>> s = State({"w": Param(1.0), "mean": BatchStat(0.0), "step": 3})
      >>> params, others = split_state(s, Param, ...)
      >>> list(params), list(others)
      (['w'], ['mean', 'step'])
      >>> split_state(s, Param, BatchStat)
      Traceback (most recent call last):
        ...
      ValueError: Non-exhaustive filters, got a non-empty remainder: ('step',) (int).
      Use `...` as the last filter to collect all remaining elements.
    """
    return _partition(state, (first, *filters), exhaustive=True)


def filter_state(
    state: Mapping[Key, Any], first: Filter, /, *filters: Filter
) -> State | tuple[State, ...]:
    """Like :func:`split_state`, but leaves that match no filter are dropped.

    Example:
      >>> from refax._statelib import State, filter_state
      >>> from refax._variables import Param
      >>> filter_state(State({"w": Param(1.0), "step": 3}), Param).to_pure_dict()
      {'w': 1.0}
    """
    return _partition(state, (first, *filters), exhaustive=False)


def merge_state(
    state: Mapping[Key, Any],
    /,
    *states: Mapping[Key, Any],
    cls: type[S] = State,  # type: ignore[assignment]
) -> S:
    """Deep-merges States into a new one; on equal paths the later State wins.

    The nested dict structure of the result is new; leaves (Variables) are shared.

    Example:
      >>> from refax._statelib import State, merge_state
      >>> merge_state(State({"a": {"x": 1}}), {"a": {"y": 2}, "b": 3}).to_pure_dict()
      {'a': {'x': 1, 'y': 2}, 'b': 3}
    """
    out = _copy_tree(_as_dict(state))
    for other in states:
        _merge_into(out, _as_dict(other))
    return cls._from_dict_unsafe(out)


def map_state(f: Callable[[PathParts, Any], Any], state: Mapping[Key, Any]) -> State:
    """Returns a State of the same structure with every leaf ``x`` at ``path`` as ``f(path, x)``.

    Example:
      >>> from refax._statelib import State, map_state
      >>> map_state(lambda path, x: x * 10, State({"a": {"b": 1}})).to_pure_dict()
      {'a': {'b': 10}}
    """
    return State._from_dict_unsafe(_map(f, _as_dict(state), ()))


def diff(state: Mapping[Key, Any], other: Mapping[Key, Any]) -> State:
    """Returns the part of ``state`` whose paths are absent from ``other`` (``state - other``).

    Example:
      >>> from refax._statelib import State, diff
      >>> diff(State({"a": {"x": 1, "y": 2}, "b": 3}), State({"a": {"x": 0}})).to_pure_dict()
      {'a': {'y': 2}, 'b': 3}
    """
    if not other:
        return state if isinstance(state, State) else State(state)
    return State._from_dict_unsafe(_diff(_as_dict(state), _as_dict(other)))
