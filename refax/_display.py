"""Text and treescope rendering of Objects, Modules and Variables, plus :func:`display`.

``repr(module)`` shows the attributes of a Module in insertion order, one per line, nested
Objects indented below their parent. The first line carries a comment summarising the
Variables of the whole subtree per Variable type (element count and bytes). Arrays of more
than one element are abbreviated to their shape and dtype. An Object reached a second time
(shared, or part of a cycle) is shown as ``Type(...)``. Setting the module attribute
``max_repr_depth`` to an int collapses everything nested deeper than that to ``Type(...)``.

Example:
  >>> import jax.numpy as jnp
  >>> from refax._module import Module
  >>> from refax._variables import BatchStat, Param
  >>> class Norm(Module):
  ...   def __init__(self):
  ...     self.scale = Param(jnp.ones((3,)))
  ...     self.mean = BatchStat(jnp.zeros((3,)))
  >>> Norm()
  Norm( # BatchStat: 3 (12 B), Param: 3 (12 B), Total: 6 (24 B)
    scale=Param( # 3 (12 B)
      value=Array(shape=(3,), dtype=dtype('float32'))
    ),
    mean=BatchStat( # 3 (12 B)
      value=Array(shape=(3,), dtype=dtype('float32'))
    )
  )
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import jax
import numpy as np

from refax._module import Module
from refax._object import _STATE_ATTR, Pytree, is_data
from refax._variables import _DEFAULT_METADATA, DISPLAY, Variable, _human_bytes, _size_bytes

__all__ = ["display", "object_repr", "treescope_object", "treescope_variable", "max_repr_depth"]

#: Nesting depth past which Objects, Variables and arrays are shown as ``Type(...)``.
max_repr_depth: int | None = None

Stats = dict[type, tuple[int, int]]  # Variable type -> (element count, bytes)


def _is_node(x: Any) -> bool:
    return isinstance(x, (Pytree, Variable))


def _attributes(obj: Pytree) -> list[tuple[str, Any]]:
    """The displayed attributes of ``obj``: insertion order, private static ones hidden."""
    return [
        (name, value)
        for name, value in vars(obj).items()
        if not isinstance(name, str)
        or (not name.startswith("_pytree__") and not (name.startswith("_") and not is_data(value)))
    ]


def _stat_type(var: Variable) -> type:
    for t in type(var).__mro__:  # RNG key/count Variables are summarised together
        if t.__name__ == "RngState":
            return t
    return type(var)


def _child_nodes(value: Any) -> list[Any]:
    """The Objects and Variables directly inside an attribute value (through containers)."""
    if _is_node(value):
        return [value]
    if type(value) in (list, tuple, dict):
        items = value.values() if type(value) is dict else value
        return [node for item in items for node in _child_nodes(item)]
    try:
        return [x for x in jax.tree.leaves(value, is_leaf=_is_node) if _is_node(x)]
    except Exception:  # not a well-formed pytree: it holds no state we can find
        return []


def _collect_stats(node: Any, memo: dict[int, Stats]) -> Stats:
    """Per-type Variable totals of ``node``'s subtree; each node is counted once per memo."""
    stats: Stats = {}
    memo[id(node)] = stats
    if isinstance(node, Variable):
        info = _size_bytes(node.get_raw_value())
        if info is not None:
            stats[_stat_type(node)] = info
        return stats
    for name in sorted(k for k in vars(node) if k != _STATE_ATTR):
        for child in _child_nodes(vars(node)[name]):
            if id(child) in memo:
                continue
            for typ, (size, nbytes) in _collect_stats(child, memo).items():
                old = stats.get(typ, (0, 0))
                stats[typ] = (old[0] + size, old[1] + nbytes)
    return stats


def _stats_comment(stats: Stats, with_type: bool = True) -> str:
    def fmt(size: int, nbytes: int) -> str:
        return f"{size:,} ({_human_bytes(nbytes)})"

    if not stats:
        return ""
    if not with_type:
        return " # " + fmt(*next(iter(stats.values())))
    parts = [f"{t.__name__}: {fmt(*sb)}" for t, sb in stats.items()]
    if len(stats) > 1:
        parts.append("Total: " + fmt(*map(sum, zip(*stats.values()))))
    return " # " + ", ".join(parts)


class _Context(threading.local):
    seen: set[int] | None = None
    stats: dict[int, Stats] | None = None


_CTX = _Context()


def _too_deep(depth: int) -> bool:
    return max_repr_depth is not None and depth > max_repr_depth


def _block(head: str, items: list[str], close: str) -> str:
    body = ",\n".join("  " + item.replace("\n", "\n  ") for item in items)
    return f"{head}\n{body}\n{close}"


def _format(value: Any, depth: int) -> str:
    if isinstance(value, Pytree):
        return _render_object(value, depth)
    if isinstance(value, Variable):
        return _render_variable(value, depth)
    if isinstance(value, (jax.Array, np.ndarray)) and np.prod(np.shape(value)) > 1:
        if _too_deep(depth):
            return "Array(...)"
        return f"Array(shape={value.shape!r}, dtype={value.dtype!r})"
    kind = type(value)
    if kind in (list, tuple, dict):
        if kind is dict:
            items = [f"{k!r}: {_format(v, depth)}" for k, v in value.items()]
        else:
            items = [_format(v, depth) for v in value]
        open_, close = {list: "[]", tuple: "()", dict: "{}"}[kind]
        if kind is tuple and len(items) == 1:
            items[0] += ","
        if any("\n" in item for item in items):
            return _block(open_, items, close)
        return open_ + ", ".join(items) + close
    return repr(value)


def _render_variable(var: Variable, depth: int) -> str:
    name = type(var).__name__
    if _too_deep(depth):
        return f"{name}(...)"
    info = _size_bytes(var.get_raw_value())
    comment = "" if info is None else _stats_comment({type(var): info}, with_type=False)
    items = [f"value={_format(var.get_raw_value(), depth + 1)}"]
    for key, val in var.get_metadata().items():
        if key in _DEFAULT_METADATA and val == _DEFAULT_METADATA[key]:
            continue
        items.append(f"{key}={_format(val, depth + 1)}")
    return _block(f"{name}({comment}", items, ")")


def _render_object(obj: Pytree, depth: int) -> str:
    name = type(obj).__name__
    seen, memo = _CTX.seen, _CTX.stats
    assert seen is not None and memo is not None
    if id(obj) in seen or _too_deep(depth):
        return f"{name}(...)"
    seen.add(id(obj))
    stats = memo[id(obj)] if id(obj) in memo else _collect_stats(obj, memo)
    items = [f"{key}={_format(value, depth + 1)}" for key, value in _attributes(obj)]
    if not items:
        return f"{name}()"
    return _block(f"{name}({_stats_comment(stats)}", items, ")")


def object_repr(obj: Pytree) -> str:
    """Returns the multi-line text representation of an Object or Module.

    Args:
      obj: the Object to render.

    Returns:
      ``Type( # stats`` followed by one ``name=value`` line per attribute and ``)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._module import Module
      >>> from refax._variables import Param
      >>> class Block(Module):
      ...   def __init__(self):
      ...     self.bias = Param(jnp.zeros((2,)))
      ...     self.name = 'block'
      >>> b = Block()
      >>> b.again = b  # a cycle
      >>> print(object_repr(b))
      Block( # Param: 2 (8 B)
        bias=Param( # 2 (8 B)
          value=Array(shape=(2,), dtype=dtype('float32'))
        ),
        name='block',
        again=Block(...)
      )
    """
    if _CTX.seen is not None:  # nested call, e.g. from the repr of a foreign container
        return _render_object(obj, 1)
    _CTX.seen, _CTX.stats = set(), {}
    try:
        return _render_object(obj, 1)
    finally:
        _CTX.seen = _CTX.stats = None


# -- treescope --------------------------------------------------------------------------------
def _treescope_node(
    node: Any,
    items: list[tuple[str, Any]],
    path: str | None,
    subtree_renderer: Any,
    comment: str,
    color: str | None = None,
) -> Any:
    from treescope import rendering_parts as rp

    children = []
    for i, (name, value) in enumerate(items):
        if i < len(items) - 1:
            comma = rp.siblings(",", rp.fold_condition(collapsed=rp.text(" ")))
        else:
            comma = rp.fold_condition(expanded=rp.text(","))
        child_path = None if path is None else f"{path}.{name}"
        line = rp.siblings_with_annotations(f"{name}=", subtree_renderer(value, path=child_path))
        children.append(rp.build_full_line_with_annotations(line, comma))
    return rp.build_foldable_tree_node_from_children(
        prefix=rp.siblings(
            rp.roundtrip_condition(roundtrip=rp.text("<")),
            rp.maybe_qualified_type_name(type(node)),
            "(",
        ),
        children=children,
        suffix=rp.siblings(")", rp.roundtrip_condition(roundtrip=rp.text(">"))),
        path=path,
        background_color=color,
        first_line_annotation=rp.comment_color(rp.text(comment)) if comment else None,
    )


def treescope_object(obj: Pytree, path: str | None, subtree_renderer: Any) -> Any:
    """Treescope rendering of an Object (``Pytree.__treescope_repr__``).

    Example:
      >>> import treescope
      >>> from refax._module import Module
      >>> class Empty(Module): pass
      >>> treescope.render_to_text(Empty())
      'Empty()'
    """
    from treescope import formatting_util

    stats = _collect_stats(obj, {})
    color = None
    if isinstance(obj, Module):
        color = formatting_util.color_from_string(type(obj).__qualname__)
    return _treescope_node(
        obj, _attributes(obj), path, subtree_renderer, _stats_comment(stats), color
    )


def treescope_variable(var: Variable, path: str | None, subtree_renderer: Any) -> Any:
    """Treescope rendering of a Variable (``Variable.__treescope_repr__``): value and metadata.

    Example:
      >>> import treescope
      >>> import jax.numpy as jnp
      >>> from refax._variables import Param
      >>> print(treescope.render_to_text(Param(jnp.float32(1.0), tag='w')))
      Param(value=<jax.Array(1., dtype=float32)>, tag='w')
    """
    items = [("value", var.get_raw_value())]
    for key, val in var.get_metadata().items():
        if not (key in _DEFAULT_METADATA and val == _DEFAULT_METADATA[key]):
            items.append((key, val))
    info = _size_bytes(var.get_raw_value())
    comment = "" if info is None else _stats_comment({type(var): info}, with_type=False)
    return _treescope_node(var, items, path, subtree_renderer, comment)


# -- display ---------------------------------------------------------------------------------
def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def display(*args: Any) -> None:
    """Shows each argument: with treescope in a notebook, else by printing its text repr.

    Example:
      >>> from refax._module import Module
      >>> class Empty(Module): pass
      >>> display(Empty(), 3)
      Empty()
      3
    """
    if _in_notebook():
        try:
            import treescope
        except ImportError:  # pragma: no cover
            treescope = None
        if treescope is not None:
            for arg in args:
                treescope.display(arg)
            return
    for arg in args:
        print(arg)


# Objects and Variables render through these (see ``refax._variables.DISPLAY``).
DISPLAY.object_repr = object_repr
DISPLAY.treescope_object = treescope_object
DISPLAY.treescope_variable = treescope_variable
