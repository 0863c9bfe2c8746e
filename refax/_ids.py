"""Unique, copy-aware identifiers (the reference's ``nnx.ids``).

``uuid()`` returns a :class:`UUID`: hashable, equal only to itself (and to identifiers with the
same number), and never reused. ``id()`` of a Python object is not enough for such keys, since
addresses are recycled once an object dies. Copying an identifier (``copy.copy`` /
``copy.deepcopy``) gives a *new* one, so an object holding an identifier and its copies never
share it.

Example:
  >>> import copy
  >>> from refax.nnx import ids
  >>> a = ids.uuid()
  >>> a == a, a == ids.uuid(), copy.copy(a) == a
  (True, False, False)
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

__all__ = ["UUID", "UUIDManager", "uuid"]


class UUID:
    """One identifier (see :func:`uuid`); ``id`` is its number.

    Example:
      >>> from refax.nnx import ids
      >>> u = ids.uuid()
      >>> hash(u) == hash(u.id)
      True
    """

    __slots__ = ("id",)

    def __init__(self, rawid: int):
        self.id = rawid

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UUID) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"UUID({self.id})"

    def __copy__(self) -> UUID:
        return uuid()

    def __deepcopy__(self, memo: dict[int, Any]) -> UUID:
        return uuid()


class UUIDManager:
    """A thread-safe source of fresh :class:`UUID` s; calling it returns the next one.

    Example:
      >>> from refax.nnx import ids
      >>> new = ids.UUIDManager()
      >>> new().id < new().id
      True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counter = itertools.count(1)

    def __call__(self) -> UUID:
        with self._lock:
            return UUID(next(self._counter))


uuid = UUIDManager()
"""Returns a new, never reused :class:`UUID`."""
