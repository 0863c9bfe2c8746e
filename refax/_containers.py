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

from refax._object import Module, _Marker

_STATE_ATTR = "_pytree__state"


def _unwrap(value: Any) -> Any:
    return value.value if type(value) is _Marker else value


class List(Module, MutableSequence):
    """A Module holding a mutable sequence of children under integer keys."""

    def __init__(self, items: Iterable[Any] = ()):
        for item in items:
            self.append(item)

    def _items(self) -> list[Any]:
        d = self.__dict__
        return [d[i] for i in range(self._len())]

    def _len(self) -> int:
        n = 0
        d = self.__dict__
        while n in d:
            n += 1
        return n

    def _write(self, items: list[Any]) -> None:
        self._check_trace()
        d = self.__dict__
        for i in range(self._len()):
            del d[i]
        for i, item in enumerate(items):
            d[i] = _unwrap(item)

    def __len__(self) -> int:
        return self._len()

    def __getitem__(self, index: Any) -> Any:
        return self._items()[index]

    def __setitem__(self, index: Any, value: Any) -> None:
        items = self._items()
        if isinstance(index, slice):
            items[index] = [_unwrap(v) for v in value]
        else:
            items[index] = value
        self._write(items)

    def __delitem__(self, index: Any) -> None:
        items = self._items()
        del items[index]
        self._write(items)

    def insert(self, index: int, value: Any) -> None:
        items = self._items()
        items.insert(index, value)
        self._write(items)

    def append(self, value: Any) -> None:
        self._check_trace()
        d = self.__dict__
        d[self._len()] = _unwrap(value)

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
