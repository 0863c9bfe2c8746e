"""The reference's ``nnx.graphlib`` (also ``nnx.graph``): the graph functions (refax/_graph)."""

from typing import Any as _Any

from refax._graph import *  # noqa: F403
from refax._graph import __all__ as _graph_all
from refax._graph._flatten import tree_children as _tree_children
from refax._module import iter_module_children as iter_module_children
from refax._module import iter_modules as iter_modules

# the Module iteration helpers live above the graph (refax/_module.py); the reference has
# them here too
__all__ = [*_graph_all, "iter_module_children", "iter_modules"]


def _flatten_pytree(pytree: _Any) -> tuple[list[tuple[_Any, _Any]], _Any]:
    """One level of a registered pytree: ``([(key, child), ...], treedef)``; the reference's
    private helper, kept for code that imports it."""
    treedef, keys, children = _tree_children(pytree)
    return list(zip(keys, children)), treedef


def _unflatten_pytree(leaves: list[tuple[_Any, _Any]], treedef: _Any) -> _Any:
    """The inverse of :func:`_flatten_pytree`."""
    return treedef.unflatten([child for _, child in leaves])
