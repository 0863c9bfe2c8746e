"""Why did this recompile? The retrace explainer of ``nnx.jit`` (``refax.config.explain_retraces``).

``nnx.jit`` traces its function again whenever what JAX keys its cache on changes: the graph
structure of the argument objects (attributes, static attribute values, sharing), the shapes
and dtypes of their state, or a static argument. With the option on, every trace after the
first describes the arguments by path and logs how that description differs from the
previous trace's, so a user sees *which* attribute made the step recompile::

    refax: nnx.jit retraced step (train.py:12) because:
      - model.dropout.rate: static value 0.1 -> 0.2
      - x: float32[32,784] -> float32[16,784]

The description is computed only while JAX traces (never on a cached call), so the option
costs nothing on the fast path.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from refax._graph._api import find_duplicates, iter_graph
from refax._object import Pytree
from refax._transforms._checks import describe_function
from refax._variables import Variable

__all__ = ["describe_arguments", "explain_retrace"]

LOGGER = logging.getLogger("refax")
_HIDDEN_METADATA = frozenset({"hijax", "ref", "eager_sharding"})


def _spec(x: Any) -> str:
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return f"static value {x!r}"
    weak = " (weak type)" if getattr(getattr(x, "aval", x), "weak_type", False) else ""
    return f"{dtype}[{','.join(map(str, shape))}]{weak}"


def _path(path: tuple) -> str:
    out = ""
    for i, key in enumerate(path):
        out += (f"[{key}]" if isinstance(key, int) else f".{key}") if i else str(key)
    return out


def describe_arguments(fun: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    """What a trace of ``fun(*args, **kwargs)`` depends on, by path: ``path -> text`` for every
    object, Variable, array and static value, plus the groups of paths sharing one object
    (key ``"<sharing>"``)."""
    try:
        named = dict(inspect.signature(fun).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        named = {f"arg{i}": a for i, a in enumerate(args)} | dict(kwargs)
    desc: dict[str, Any] = {}
    for path, x in iter_graph(named):
        if not path:
            continue
        key = _path(path)
        if isinstance(x, Variable):
            meta = {k: v for k, v in x.get_metadata().items() if k not in _HIDDEN_METADATA}
            extra = f" {meta}" if meta else ""
            desc[key] = f"{type(x).__name__} {_spec(x.get_raw_value())}{extra}"
        elif isinstance(x, Pytree):
            desc[key] = type(x).__name__
        elif isinstance(x, (list, tuple, dict)):
            desc[key] = f"{type(x).__name__} of {len(x)}"
        else:
            desc[key] = _spec(x)
    desc["<sharing>"] = frozenset(
        frozenset(_path(p) for p in group) for group in find_duplicates(named)
    )
    return desc


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    lines = []
    inner = lambda k: any(k.startswith(p + ".") or k.startswith(p + "[") for p in lines_removed)
    lines_removed: list[str] = []
    for key in sorted(old.keys() - new.keys() - {"<sharing>"}):
        if not inner(key):
            lines.append(f"{key}: removed (was {old[key]})")
            lines_removed.append(key)
    added: list[str] = []
    for key in sorted(new.keys() - old.keys()):
        if not any(key.startswith(p + ".") or key.startswith(p + "[") for p in added):
            lines.append(f"{key}: added ({new[key]})")
            added.append(key)
    for key in sorted(old.keys() & new.keys() - {"<sharing>"}):
        if old[key] != new[key]:
            before, after = old[key], new[key]
            prefix = "static value "
            if before.startswith(prefix) and after.startswith(prefix):
                before, after = prefix + before[len(prefix) :], after[len(prefix) :]
            lines.append(f"{key}: {before} -> {after}")
    for group in new["<sharing>"] - old["<sharing>"]:
        lines.append(f"sharing: {' and '.join(sorted(group))} are now the same object")
    for group in old["<sharing>"] - new["<sharing>"]:
        lines.append(f"sharing: {' and '.join(sorted(group))} are no longer the same object")
    return lines


def explain_retrace(fun: Callable[..., Any], previous: dict | None, current: dict) -> str | None:
    """The log message for a retrace (None for the first trace)."""
    if previous is None:
        return None
    lines = _differences(previous, current)
    if not lines:
        lines = [
            "no change in the arguments' structure, shapes, dtypes or static values (other "
            "causes: the graph / graph_updates mode, shardings, donation, weak types or the "
            "JAX configuration)"
        ]
    body = "\n".join(f"  - {line}" for line in lines)
    return f"nnx.jit retraced {describe_function(fun)} because:\n{body}"


def log_retrace(fun: Callable[..., Any], previous: dict | None, current: dict) -> None:
    message = explain_retrace(fun, previous, current)
    if message is not None:
        LOGGER.warning(message)
