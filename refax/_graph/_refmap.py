"""RefMap and IndexMap: the node <-> index tables behind the low-level graph API.

A walk numbers the graph nodes it meets (``flatten``'s node indices); a rebuild finds nodes by
those numbers (``unflatten``). Passing one table to several walks (``split_context``) or
rebuilds (``merge_context``) makes them share the numbering, so a node met again becomes a
reference to the first one instead of a copy.

Example:
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> v = nnx.Param(jnp.ones(2))
  >>> refmap = nnx.graphlib.RefMap()
  >>> _ = nnx.graphlib.flatten([v, v], ref_index=refmap)
  >>> v in refmap, len(refmap)
  (True, 1)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any


class RefMap(MutableMapping[Any, int]):
    """A mapping from objects (compared by identity, hashable or not) to node indices.

    It holds the objects it maps, so their identities stay valid while it lives.
    """

    __slots__ = ("_index", "_objects")

    def __init__(self, items: Mapping[Any, int] | None = None):
        self._index: dict[int, int] = {}  # id(object) -> index
        self._objects: dict[int, Any] = {}  # id(object) -> object
        if items is not None:
            for obj, idx in items.items():
                self[obj] = idx

    @classmethod
    def from_indexmap(cls, indexmap: Mapping[int, Any]) -> RefMap:
        """The inverse of an :class:`IndexMap` (index -> object)."""
        out = cls()
        for idx, obj in indexmap.items():
            out[obj] = idx
        return out

    def __getitem__(self, obj: Any) -> int:
        return self._index[id(obj)]

    def __setitem__(self, obj: Any, idx: int) -> None:
        self._index[id(obj)] = idx
        self._objects[id(obj)] = obj

    def __delitem__(self, obj: Any) -> None:
        del self._index[id(obj)]
        del self._objects[id(obj)]

    def __contains__(self, obj: object) -> bool:
        return id(obj) in self._index

    def __iter__(self) -> Iterator[Any]:
        return iter(self._objects.values())

    def __len__(self) -> int:
        return len(self._index)

    def items(self):  # type: ignore[override]
        objects = self._objects
        return [(objects[k], idx) for k, idx in self._index.items()]

    def __repr__(self) -> str:
        return f"RefMap({len(self)} nodes)"


class IndexMap(dict):
    """A mapping from node indices to the objects built for them (a plain ``dict``)."""

    @classmethod
    def from_refmap(cls, refmap: RefMap) -> IndexMap:
        """The inverse of a :class:`RefMap` (object -> index)."""
        return cls((idx, obj) for obj, idx in refmap.items())
