"""The reference's ``nnx.module``: Module and its iteration helpers (refax/_module.py)."""

from refax._graph import iter_children as iter_children
from refax._module import M as M
from refax._module import Module as Module
from refax._module import iter_modules as iter_modules

__all__ = ["M", "Module", "iter_children", "iter_modules"]
