"""``nnx.tabulate``: a table of a model's sub-Module calls, shapes and Variables.

``tabulate(model, *inputs)`` runs ``model(*inputs)`` once under an abstract trace
(``jax.eval_shape``: nothing is computed, compiled or changed in ``model``) while every method
call of every Module in the model is recorded. Each recorded call becomes a row: its path (plus
the method name when it is not ``__call__``), the Module's type, the shapes of its inputs and
outputs, and, per Variable type, the number of elements and bytes the Module holds (the
Variables that are direct attributes are listed by name). With ``compute_flops`` /
``compute_vjp_flops`` each call is traced into its own jaxpr and its cost is estimated by XLA's
cost analysis of the *lowered* (never compiled) computation.

The table is drawn with ``rich`` when it is installed (colours only on a terminal), as plain
text otherwise.

Example:
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu)
  >>> table = nnx.tabulate(model, jnp.ones((2, 4)), console_kwargs={"width": 200})
  >>> "layers/0" in table and "float32[2,8]" in table and "Total Parameters: 40" in table
  True
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from refax._graph import iter_graph as _iter_graph
from refax._graph import merge as _merge
from refax._graph import split as _split
from refax._graph import update as _update
from refax._module import Module
from refax._object import Pytree
from refax._statelib import State, to_flat_state
from refax._variables import Variable

__all__ = ["CallInfo", "tabulate", "filter_rng_streams"]


@dataclasses.dataclass
class CallInfo:
    """One recorded method call: a row of the table.

    Args:
      path: the Module's path in the model, plus the method name unless it is ``__call__``.
      type: the Module's class.
      method: the method's name.
      inputs: ``(args, kwargs)`` with arrays as ``jax.ShapeDtypeStruct``.
      outputs: the return value, arrays as ``jax.ShapeDtypeStruct``.
      stats: Variable type name -> ``(elements, bytes)`` held by the Module.
      own: Variable type name -> ``[(attribute, ShapeDtypeStruct, metadata)]`` for the
        Variables that are direct attributes (metadata: the user's entries).
      flops: estimated forward flops (``None`` unless requested).
      vjp_flops: estimated flops of the forward and backward pass (``None`` unless requested).

    Example:
      >>> from refax import nnx
      >>> info = nnx.summary.CallInfo(("lin",), nnx.Linear, "__call__", ((), {}), None, {}, {})
      >>> info.path
      ('lin',)
    """

    path: tuple
    type: type
    method: str
    inputs: tuple
    outputs: Any
    stats: dict
    own: dict
    flops: float | None = None
    vjp_flops: float | None = None


def filter_rng_streams(row: CallInfo) -> bool:
    """The default ``row_filter``: drops calls of RNG streams (``rngs.params()``, ...).

    Args:
      row: the recorded call.

    Returns:
      ``False`` for rows whose Module type is an RNG stream or ``Rngs``.

    Example:
      >>> from refax import nnx
      >>> row = nnx.summary.CallInfo((), nnx.Linear, "__call__", ((), {}), None, {}, {})
      >>> nnx.summary.filter_rng_streams(row)
      True
    """
    return row.type.__name__ not in ("RngStream", "Rngs")


# -- recording ---------------------------------------------------------------------------------

_LOCK = threading.RLock()  # tabulate patches Module classes for its duration
_ACTIVE = threading.local()


def _is_node(x: Any) -> bool:
    return isinstance(x, (Pytree, Variable))


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct, np.generic))


def _abstract(tree: Any) -> Any:
    """``tree`` with every array replaced by its ShapeDtypeStruct."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if _is_array(x) else x,
        tree,
        is_leaf=_is_node,
    )


def _stat_name(var: Variable) -> str:
    for t in type(var).__mro__:  # RNG key and count Variables are summarised together
        if t.__name__ == "RngState":
            return "RngState"
    return type(var).__name__


def _size_bytes(value: Any) -> tuple[int, int]:
    shape = np.shape(value) if not hasattr(value, "shape") else value.shape
    size = int(np.prod(shape, dtype=np.int64))
    dtype = getattr(value, "dtype", None)
    itemsize = getattr(dtype, "itemsize", None) if dtype is not None else None
    if itemsize is None:
        itemsize = np.asarray(value).dtype.itemsize
    return size, size * int(itemsize)


_HIDDEN_METADATA = frozenset({"hijax", "ref", "eager_sharding"})  # modes, not user metadata


def _module_stats(module: Any) -> tuple[dict, dict]:
    """(per type: (elements, bytes), per type: [(name, abstract value)] of direct attributes)."""
    stats: dict[str, tuple[int, int]] = {}
    for _, node in _iter_graph(module, graph=True):
        if isinstance(node, Variable):
            value = node.get_raw_value()
            if not hasattr(value, "shape") and not isinstance(value, (int, float, complex)):
                continue
            name = _stat_name(node)
            size, nbytes = _size_bytes(value)
            old = stats.get(name, (0, 0))
            stats[name] = (old[0] + size, old[1] + nbytes)
    own: dict[str, list] = {}
    for attr, value in sorted(vars(module).items(), key=lambda kv: str(kv[0])):
        if isinstance(value, Variable):
            raw = value.get_raw_value()
            if hasattr(raw, "shape"):
                meta = {k: v for k, v in value.get_metadata().items() if k not in _HIDDEN_METADATA}
                own.setdefault(_stat_name(value), []).append(
                    (attr, jax.ShapeDtypeStruct(raw.shape, raw.dtype), meta)
                )
    return stats, own


class _Recorder:
    """Per-tabulate state: canonical node keys, recorded rows, settings."""

    def __init__(self, flops: bool, vjp_flops: bool):
        self.flops = flops
        self.vjp_flops = vjp_flops
        self.paths: dict[int, tuple] = {}  # id(node) -> path of the original node
        self.keep: list[Any] = []  # keeps registered nodes alive (their ids stay unique)
        self.rows: list[CallInfo] = []
        self.seen: set = set()

    def register(self, root: Any, prefix: tuple = ()) -> None:
        """Gives every node under ``root`` the path it has under ``prefix``."""
        self.keep.append(root)
        for path, node in _iter_graph(root, graph=True):
            if isinstance(node, Pytree):
                self.paths.setdefault(id(node), (*prefix, *path))

    def register_copy(self, original: Any, copy: Any) -> None:
        """Maps the nodes of ``copy`` (a merge of ``original``'s split) to the originals."""
        self.keep.append(copy)
        a = [n for _, n in _iter_graph(original, graph=True) if isinstance(n, Pytree)]
        b = [n for _, n in _iter_graph(copy, graph=True) if isinstance(n, Pytree)]
        for x, y in zip(a, b):
            if id(x) in self.paths:
                self.paths.setdefault(id(y), self.paths[id(x)])


def _split_dynamic(tree: Any) -> tuple[list, Callable[[list], Any]]:
    """Arrays of ``tree`` (dynamic) and a function rebuilding it from new arrays."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_node)
    where = [i for i, x in enumerate(leaves) if _is_array(x) or isinstance(x, jax.core.Tracer)]

    def rebuild(dynamic: list) -> Any:
        new = list(leaves)
        for i, x in zip(where, dynamic):
            new[i] = x
        return jax.tree.unflatten(treedef, new)

    return [leaves[i] for i in where], rebuild


def _cost(fun: Callable, avals: list) -> float | None:
    try:
        cost = jax.jit(fun).lower(*avals).cost_analysis()
    except Exception:  # an estimate only: a computation XLA cannot cost shows no number
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    return float(cost.get("flops", 0.0))


def _vjp_fun(fun: Callable) -> Callable:
    def run(*primals: Any) -> Any:
        out, pullback = jax.vjp(fun, *primals)
        cts = [
            jnp.ones_like(o)
            if jnp.issubdtype(o.dtype, jnp.inexact)
            else np.zeros(o.shape, jax.dtypes.float0)
            for o in out
        ]
        return pullback(cts)

    return run


def _traced_call(rec: _Recorder, row: CallInfo, module: Any, fn: Callable, args, kwargs) -> Any:
    """Calls ``fn(module, ...)`` through its own jaxpr, estimating its flops on the way."""
    graphdef, state = _split(module)
    flat = list(to_flat_state(state))
    paths = [p for p, _ in flat]
    raw = [v.get_raw_value() if isinstance(v, Variable) else v for _, v in flat]
    dyn_args, rebuild_args = _split_dynamic((args, kwargs))
    out_box: list = []

    def pure(raw_state: list, dyn: list) -> tuple[list, list]:
        copy = _merge(graphdef, State.from_flat_path(list(zip(paths, raw_state))))
        rec.register_copy(module, copy)
        a, k = rebuild_args(dyn)
        out = fn(copy, *a, **k)
        new_flat = dict(to_flat_state(_split(copy)[1]))
        new_raw = [
            new_flat[p].get_raw_value() if isinstance(new_flat.get(p), Variable) else r
            for p, r in zip(paths, raw_state)
        ]
        dyn_out, rebuild_out = _split_dynamic(out)
        out_box.append(rebuild_out)
        return dyn_out, new_raw

    closed = jax.make_jaxpr(pure)(raw, dyn_args)
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in closed.in_avals]
    fun = jex.core.jaxpr_as_fun(closed)
    if rec.flops:
        row.flops = _cost(fun, avals)
    if rec.vjp_flops:
        row.vjp_flops = _cost(_vjp_fun(fun), avals)
    results = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *jax.tree.leaves((raw, dyn_args)))
    n_out = len(results) - len(raw)
    dyn_out, new_raw = results[:n_out], results[n_out:]
    _update(module, State.from_flat_path(list(zip(paths, new_raw))))
    return out_box[-1](list(dyn_out))


def _wrap(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def recorded(self: Any, *args: Any, **kwargs: Any) -> Any:
        rec: _Recorder | None = getattr(_ACTIVE, "recorder", None)
        if rec is None or id(self) not in rec.paths:
            return fn(self, *args, **kwargs)
        path = rec.paths[id(self)]
        if name != "__call__":
            path = (*path, name)
        inputs = _abstract((args, kwargs))
        key = (rec.paths[id(self)], name, _format_inputs(inputs))
        if key in rec.seen:  # a shared Module, or the same call again: one row
            return fn(self, *args, **kwargs)
        rec.seen.add(key)
        stats, own = _module_stats(self)
        row = CallInfo(path, type(self), name, inputs, None, stats, own)
        rec.rows.append(row)
        if rec.flops or rec.vjp_flops:
            try:
                out = _traced_call(rec, row, self, fn, args, kwargs)
            except Exception:  # not traceable on its own (e.g. static outputs): no estimate
                row.flops = row.vjp_flops = None
                out = fn(self, *args, **kwargs)
        else:
            out = fn(self, *args, **kwargs)
        row.outputs = _abstract(out)
        return out

    recorded.__refax_summary_original__ = fn  # type: ignore[attr-defined]
    return recorded


def _patch_targets(model: Any) -> list[tuple[type, str, Callable]]:
    """The (class, name, function) of every public method of the Module classes in ``model``."""
    classes = {type(n) for _, n in _iter_graph(model, graph=True) if isinstance(n, Module)}
    base = set(Module.__mro__)
    targets = {}
    for cls in classes:
        for klass in cls.__mro__:
            if klass in base or not isinstance(klass, type) or klass is object:
                continue
            for attr, fn in vars(klass).items():
                if not inspect.isfunction(fn) or (attr != "__call__" and attr.startswith("_")):
                    continue
                if hasattr(fn, "__refax_summary_original__"):
                    continue
                targets[(klass, attr)] = fn
    return [(k, a, f) for (k, a), f in targets.items()]


def _record(obj: Any, method: str, args: tuple, kwargs: dict, flops: bool, vjp: bool) -> list:
    rec = _Recorder(flops, vjp)
    graphdef, state = _split(obj)
    flat = list(to_flat_state(state))
    paths = [p for p, _ in flat]
    raw = [v.get_raw_value() if isinstance(v, Variable) else v for _, v in flat]
    dyn, rebuild = _split_dynamic((args, kwargs))

    def run(raw_state: list, dyn_inputs: list) -> None:
        copy = _merge(graphdef, State.from_flat_path(list(zip(paths, raw_state))))
        rec.register(copy)
        a, k = rebuild(dyn_inputs)
        getattr(copy, method)(*a, **k)

    with _LOCK:
        targets = _patch_targets(obj)
        for klass, attr, fn in targets:
            setattr(klass, attr, _wrap(attr, fn))
        _ACTIVE.recorder = rec
        try:
            jax.eval_shape(run, raw, dyn)
        finally:
            _ACTIVE.recorder = None
            for klass, attr, fn in targets:
                setattr(klass, attr, fn)
    return rec.rows


# -- formatting --------------------------------------------------------------------------------


def _format_value(x: Any) -> str:
    if isinstance(x, jax.ShapeDtypeStruct) or (hasattr(x, "shape") and hasattr(x, "dtype")):
        return f"{x.dtype}[{','.join(map(str, x.shape))}]"
    if isinstance(x, (list, tuple)) and x:
        return "\n".join("- " + _format_value(v).replace("\n", "\n  ") for v in x)
    if isinstance(x, Mapping) and x:
        return "\n".join(f"{k}: " + _format_value(v).replace("\n", "\n  ") for k, v in x.items())
    if isinstance(x, Pytree):
        return type(x).__name__
    return repr(x)


def _format_inputs(inputs: tuple) -> str:
    args, kwargs = inputs
    if len(args) == 1 and not kwargs:
        return _format_value(args[0])
    lines = ["- " + _format_value(a).replace("\n", "\n  ") for a in args]
    lines += [f"{k}: " + _format_value(v).replace("\n", "\n  ") for k, v in kwargs.items()]
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    if n < 1000:
        return f"{n:,} B"
    size, unit = n / 1000, "KB"
    for bigger in ("MB", "GB", "TB"):
        if size < 1000:
            break
        size, unit = size / 1000, bigger
    return f"{size:.1f} {unit}"


def _size_cell(size: int, nbytes: int) -> str:
    return f"{size:,} ({_human_bytes(nbytes)})"


def _var_cell(row: CallInfo, typ: str) -> str:
    if typ not in row.stats:
        return ""
    lines = []
    for name, v, meta in row.own.get(typ, []):
        if not meta:
            lines.append(f"{name}: {_format_value(v)}")
            continue
        lines.append(f"{name}:")  # user metadata: one line per entry, the value among them
        entries = {**{k: str(m) for k, m in meta.items()}, "value": _format_value(v)}
        lines += [f"  {k}: {entries[k]}" for k in sorted(entries)]
    if lines:
        lines.append("")
    lines.append(_size_cell(*row.stats[typ]))
    return "\n".join(lines)


def _format_flops(x: float | None) -> str:
    return "" if x is None else f"{int(x):,}" if float(x).is_integer() else f"{x:,.1f}"


def _render_plain(title: str, header: list, rows: list[list[str]], caption: str) -> str:
    """A box-drawn text table (used when ``rich`` is not installed)."""
    cells = [[c.split("\n") for c in row] for row in [header, *rows]]
    widths = [max(len(line) for row in cells for line in row[i]) for i in range(len(header))]

    def sep(left: str, mid: str, right: str, fill: str) -> str:
        return left + mid.join(fill * (w + 2) for w in widths) + right

    out = [title.center(sum(widths) + 3 * len(widths) + 1), sep("┌", "┬", "┐", "─")]
    for r, row in enumerate(cells):
        for i in range(max(len(c) for c in row)):
            parts = []
            for c, w in zip(row, widths):
                parts.append(" " + (c[i] if i < len(c) else "").ljust(w) + " ")
            out.append("│" + "│".join(parts) + "│")
        out.append(sep("└", "┴", "┘", "─") if r == len(cells) - 1 else sep("├", "┼", "┤", "─"))
    out += ["", caption.center(len(out[1]))]
    return "\n".join(out)


def tabulate(
    obj: Any,
    *input_args: Any,
    depth: int | None = None,
    method: str = "__call__",
    row_filter: Callable[[CallInfo], bool] = filter_rng_streams,
    table_kwargs: Mapping[str, Any] = {},  # noqa: B006 (read only)
    column_kwargs: Mapping[str, Any] = {},  # noqa: B006
    console_kwargs: Mapping[str, Any] = {},  # noqa: B006
    compute_flops: bool = False,
    compute_vjp_flops: bool = False,
    **input_kwargs: Any,
) -> str:
    """Summarises ``obj.<method>(*input_args, **input_kwargs)`` as a table (returned as text).

    The call runs once under ``jax.eval_shape``: nothing is computed or compiled and ``obj``
    is left unchanged (its RNG counters and batch statistics included). Inputs may be arrays or
    ``jax.ShapeDtypeStruct``.

    Args:
      obj: the model (a Module).
      *input_args: positional arguments of the call.
      depth: keep rows whose path has at most this many parts (``None``: all).
      method: the name of the method to call (default ``'__call__'``).
      row_filter: a predicate on :class:`CallInfo` selecting the rows shown.
      table_kwargs: extra keyword arguments of ``rich.table.Table``.
      column_kwargs: extra keyword arguments of ``rich.table.Table.add_column``.
      console_kwargs: extra keyword arguments of ``rich.console.Console`` (e.g. ``width``,
        ``force_terminal``).
      compute_flops: add a ``flops`` column (XLA's estimate of each call's forward pass).
      compute_vjp_flops: add a ``vjp_flops`` column (forward and backward pass).
      **input_kwargs: keyword arguments of the call.

    Returns:
      The rendered table.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> class MLP(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.hidden = nnx.Linear(3, 4, rngs=rngs)
      ...         self.out = nnx.Linear(4, 1, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.out(nnx.relu(self.hidden(x)))
      >>> text = nnx.tabulate(MLP(nnx.Rngs(0)), jnp.ones((8, 3)), console_kwargs={"width": 120})
      >>> [line.split("│")[1].strip() for line in text.splitlines() if "Linear" in line]
      ['hidden', 'out']
    """
    rows = _record(obj, method, input_args, dict(input_kwargs), compute_flops, compute_vjp_flops)
    if depth is not None:
        rows = [r for r in rows if len(r.path) <= depth]
    rows = [r for r in rows if row_filter(r)]

    totals: dict[str, tuple[int, int]] = {}
    for _, node in _iter_graph(obj, graph=True):
        if isinstance(node, Variable):
            raw = node.get_raw_value()
            if hasattr(raw, "shape"):
                size, nbytes = _size_bytes(raw)
                old = totals.get(_stat_name(node), (0, 0))
                totals[_stat_name(node)] = (old[0] + size, old[1] + nbytes)
    var_types = sorted(totals)

    header = ["path", "type", "inputs", "outputs"]
    if compute_flops:
        header.append("flops")
    if compute_vjp_flops:
        header.append("vjp_flops")
    n_fixed = len(header)
    header += var_types

    body = []
    for r in rows:
        cells = [
            "/".join(map(str, r.path)),
            r.type.__name__,
            _format_inputs(r.inputs),
            "" if r.outputs is None and r.method != "__call__" else _format_value(r.outputs),
        ]
        if compute_flops:
            cells.append(_format_flops(r.flops))
        if compute_vjp_flops:
            cells.append(_format_flops(r.vjp_flops))
        cells += [_var_cell(r, t) for t in var_types]
        body.append(cells)
    total_row = [""] * (n_fixed - 1) + ["Total"] + [_size_cell(*totals[t]) for t in var_types]
    grand = (sum(s for s, _ in totals.values()), sum(b for _, b in totals.values()))
    title = f"{type(obj).__name__} Summary"
    caption = f"Total Parameters: {_size_cell(*grand)}"

    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:  # optional dependency: plain text
        return _render_plain(title, header, [*body, total_row], caption)

    table = Table(title=title, show_lines=True, **{"show_header": True, **table_kwargs})
    for name in header:
        table.add_column(name, **column_kwargs)
    for cells in body:
        table.add_row(*(Text(c) for c in cells))
    total_cells = [Text(c) for c in total_row]
    total_cells[n_fixed - 1] = Text("Total", justify="right")
    table.add_row(*total_cells, style="bold")
    table.caption = "\n" + caption
    table.caption_style = "bold"
    options = {"force_terminal": sys.stdout.isatty(), **console_kwargs}
    buffer = io.StringIO()
    console = Console(file=buffer, **options)
    console.print(table)
    return buffer.getvalue()
