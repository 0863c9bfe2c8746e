"""Converting the Variables of a node between modes: ``with_vars`` (and ``vars_as``).

A Variable's mode (``hijax``, ``ref``; see ``refax/_refs.py``) is fixed when it is made, so
converting means making new Variables: ``with_vars`` returns a copy of the node in which every
selected Variable whose mode differs is replaced by ``variable.copy(**modes)``. The other
Variables (and the arrays) are the node's own; Objects and containers are new.

A Variable reached along two paths is an error unless ``allow_duplicates=True`` (as in the
reference, which would otherwise turn it into several independent Variables); with it, the
copy keeps the sharing: one new Variable stands at all of the old one's paths.
"""

from __future__ import annotations

import warnings
from typing import Any, TypeVar

from refax._filters import to_predicate
from refax._graph import find_duplicates
from refax._graph import map as graph_map
from refax._object import Pytree
from refax._variables import Variable

__all__ = ["with_vars", "vars_as"]

A = TypeVar("A")
_MODE_KEYS = ("hijax", "ref")


def _at(node: Any, path: tuple) -> Any:
    for key in path:
        node = node.__dict__[key] if isinstance(node, Pytree) else node[key]
    return node


def with_vars(
    node: A,
    /,
    *,
    hijax: bool | None = None,
    ref: bool | None = None,
    mutable: bool | None = None,
    only: Any = ...,
    allow_duplicates: bool = False,
) -> A:
    """Returns a copy of ``node`` whose selected Variables are in the requested modes.

    Args:
      node: a graph node, a Variable, a State or any pytree of them.
      hijax: keep values in private JAX references (``True``) or as plain arrays (``False``).
      ref: keep values in ``jax.Ref`` s handed out as raw values (``True``) or not.
      mutable: sets the ``mutable`` metadata entry.
      only: filter selecting the Variables to convert (default: all).
      allow_duplicates: convert a Variable reached along several paths anyway (the copy
        keeps the sharing: one new Variable at all of its paths).

    Returns:
      The copy; Variables already in the requested modes, or not selected, are the node's
      own objects.

    Raises:
      ValueError: a Variable to convert is reached along several paths (the message lists
        them) and ``allow_duplicates`` is False.

    Example:
      >>> import jax
      >>> from refax import nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> refs = nnx.with_vars(model, ref=True, only=nnx.Param)
      >>> isinstance(refs.kernel.get_raw_value(), jax.Ref), model.kernel.ref
      (True, False)
      >>> back = nnx.with_vars(refs, ref=False)
      >>> back.kernel.ref
      False
    """
    modes = {
        k: v for k, v in (("hijax", hijax), ("ref", ref), ("mutable", mutable)) if v is not None
    }
    pred = to_predicate(only)

    def differs(x: Variable) -> bool:
        meta = x._var_metadata
        for key, value in modes.items():
            current = bool(meta.get(key, False)) if key in _MODE_KEYS else meta.get(key)
            if current != value:
                return True
        return False

    def selected(path: tuple, x: Any) -> bool:
        return isinstance(x, Variable) and differs(x) and pred(path, x)

    if not allow_duplicates:
        groups = [g for g in find_duplicates(node) if selected(g[0], _at(node, g[0]))]
        if groups:
            text = "\n  ---".join(
                "".join(f"\n  {'/'.join(map(str, p))}" for p in group) for group in groups
            )
            raise ValueError(
                f"Found duplicate at paths:{text}\n  ---\nThese Variables are shared: the copy "
                "would turn each into several independent Variables. Convert them before "
                "sharing them, or pass allow_duplicates=True."
            )

    def convert(path: tuple, x: Any) -> Any:
        return x.copy(**modes) if selected(path, x) else x

    return graph_map(convert, node)


def vars_as(node: A, /, **kwargs: Any) -> A:
    """Deprecated name of :func:`with_vars`.

    Example:
      >>> import warnings
      >>> from refax import nnx
      >>> with warnings.catch_warnings():
      ...   warnings.simplefilter("ignore", DeprecationWarning)
      ...   nnx.vars_as(nnx.Param(1.0), hijax=True).hijax
      True
    """
    warnings.warn(
        "vars_as is deprecated: use nnx.with_vars instead.", DeprecationWarning, stacklevel=2
    )
    return with_vars(node, **kwargs)
