"""``nnx.List`` and ``nnx.Dict``: Modules that behave like a list and a dict of children.

Plain Python lists and dicts are valid attributes in refax, so these are rarely needed; they
exist for code written against APIs that require them. Their items are the Module's own
attributes (integer keys for ``List``), so state paths read ``layers.0.kernel`` either way.

Example:
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> layers = nnx.List([nnx.Param(jnp.ones(2)), nnx.Param(jnp.zeros(2))])
  >>> layers.append(nnx.Param(jnp.ones(1)))
  >>> len(layers), list(nnx.state(layers).keys())
  (3, [0, 1, 2])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping, MutableSequence
from typing import Any

from refax._module import Module
from refax._object import _STATE_ATTR, _check_static, _Marker
from refax._tracers import bump_epoch

_Entry = tuple[Any, "str | None"]  # (item, 'data' | 'static' | None: its nnx.data/static mark)


def _entry(value: Any) -> _Entry:
    return (value.value, value.kind) if type(value) is _Marker else (value, None)


class List(Module, MutableSequence):
    """A Module holding a mutable sequence of children under integer keys.

    Items may be wrapped in :func:`refax.data` / :func:`refax.static` to mark them data or
    static (for ``jax.tree`` functions and the GraphDef); the mark moves with the item when
    items are inserted or deleted before it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from refax import nnx
      >>> ls = nnx.List([jnp.ones(2), nnx.static(3), nnx.data(0.5)])
      >>> jax.tree.leaves(ls)
      [Array([1., 1.], dtype=float32), 0.5]
    """

    def __init__(self, items: Iterable[Any] = ()):
        entries = [_entry(item) for item in items]
        if any(kind is not None for _, kind in entries):
            self._write(entries)
        else:
            d = self.__dict__
            for i, (item, _) in enumerate(entries):
                d[i] = item

    def _items(self) -> list[Any]:
        d = self.__dict__
        return [d[i] for i in range(self._len())]

    def _entries(self) -> list[_Entry]:
        d = self.__dict__
        st = d[_STATE_ATTR]
        static_names, data_names = st.static_names, st.data_names
        if not static_names and not data_names:
            return [(d[i], None) for i in range(self._len())]
        return [
            (d[i], "static" if i in static_names else "data" if i in data_names else None)
            for i in range(self._len())
        ]

    def _len(self) -> int:
        n = 0
        d = self.__dict__
        while n in d:
            n += 1
        return n

    def _write(self, entries: list[_Entry]) -> None:
        """Replaces every item (and every item's mark) with ``entries``."""
        self._check_trace()
        for i, (item, kind) in enumerate(entries):
            if kind == "static":
                _check_static(self, i, item, "marker")
        d = self.__dict__
        st = d[_STATE_ATTR]
        for i in range(self._len()):
            del d[i]
        for i, (item, _) in enumerate(entries):
            d[i] = item
        # the marks of the items: int keys, rebuilt from scratch (other keys are kept)
        static_names = {n for n in st.static_names if type(n) is not int}
        data_names = {n for n in st.data_names if type(n) is not int}
        static_names.update(i for i, (_, kind) in enumerate(entries) if kind == "static")
        data_names.update(i for i, (_, kind) in enumerate(entries) if kind == "data")
        if static_names != st.static_names or data_names != st.data_names:
            st.static_names, st.data_names = frozenset(static_names), frozenset(data_names)
            bump_epoch()  # marks are part of a walk's structure (refax/_graph/README.md)
        st.layout = st.snap = None

    def __len__(self) -> int:
        return self._len()

    def __getitem__(self, index: Any) -> Any:
        return self._items()[index]

    def __setitem__(self, index: Any, value: Any) -> None:
        entries = self._entries()
        if isinstance(index, slice):
            entries[index] = [_entry(v) for v in value]
        else:
            entries[index] = _entry(value)
        self._write(entries)

    def __delitem__(self, index: Any) -> None:
        entries = self._entries()
        del entries[index]
        self._write(entries)

    def insert(self, index: int, value: Any) -> None:
        entries = self._entries()
        entries.insert(index, _entry(value))
        self._write(entries)

    def append(self, value: Any) -> None:
        if type(value) is _Marker:
            self._write([*self._entries(), _entry(value)])
            return
        self._check_trace()
        d = self.__dict__
        d[self._len()] = value

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items())

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = Module.__hash__


class Dict(Module, MutableMapping):
    """A Module holding a mutable mapping of children; items are also attributes."""

    def __init__(self, *args: Any, **kwargs: Any):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __getitem__(self, key: str) -> Any:
        try:
            return self.__dict__[key] if key != _STATE_ATTR else _raise(key)
        except KeyError:
            raise KeyError(key) from None

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __delitem__(self, key: str) -> None:
        if key not in self.__dict__ or key == _STATE_ATTR:
            raise KeyError(key)
        delattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return (k for k in self.__dict__ if k != _STATE_ATTR)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = Module.__hash__

    def _asdict(self) -> Mapping[str, Any]:
        return {k: self.__dict__[k] for k in self}


def _raise(key: str) -> Any:
    raise KeyError(key)
