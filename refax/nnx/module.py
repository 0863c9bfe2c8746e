"""The reference's ``nnx.module``: Module and its iteration helpers (refax/_object.py)."""

from refax._graph import iter_children as iter_children
from refax._graph import iter_modules as iter_modules
from refax._object import M as M
from refax._object import Module as Module

__all__ = ["M", "Module", "iter_children", "iter_modules"]
