"""Graph operations of refax vs flax.nnx vs the ``jax.tree`` limit.

The model has ``NUM_BLOCKS`` blocks of Linear (kernel + bias) + LayerNorm (scale + bias), i.e.
4 * NUM_BLOCKS Params of width ``WIDTH``: arrays are tiny on purpose, so every figure is
framework overhead. The same layer code (``_models.make_model_classes``) is instantiated for
both libraries.

The limit is what ``jax.tree`` does on a plain nested dict holding the same 1000 arrays:
``jax.tree.flatten`` for walks (split, state, graphdef, update, clone) and
``jax.tree.unflatten`` for rebuilds (merge). Ratios are op time / limit time.

"first" rows clear refax's flatten cache (``refax._graph._cache.clear(model)``, untimed) before
every timed call, so each call is a full walk; "repeated" rows call the op again on an
unchanged model (refax serves it from its cache). flax.nnx has no such cache: its split is a
full walk every time, so its first and repeated rows are one measurement.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
from _models import make_model_classes, preset_inits, pure_dict
from _timing import Settings, SuiteResult, Timing, fmt_ratio, fmt_time, measure_interleaved

TITLE = "split / state / graphdef / merge / update / clone: refax vs flax.nnx vs jax.tree"
NUM_BLOCKS = 250
WIDTH = 8


@dataclass(frozen=True)
class Op:
    """One table row.

    ``limit``: ``"flatten"``, ``"unflatten"`` or None. ``target``: maximum refax/limit ratio,
    or, with ``vs_flax``, maximum refax/flax ratio; None means informational only.
    ``first``: time refax with its cache cleared before each call. ``flax_as``: reuse the flax
    figure of the named row (flax has no cache, so first == repeated).
    """

    name: str
    limit: str | None = None
    target: float | None = None
    vs_flax: bool = False
    first: bool = False
    flax_as: str | None = None


OPS = [
    Op("construct (jax.random init)", target=1.0, vs_flax=True),
    Op("construct (preset arrays)", target=1.0, vs_flax=True),
    Op("split (first)", "flatten", 10.0, first=True),
    Op("state (first)", "flatten", 10.0, first=True),
    Op("graphdef (first)", "flatten", 10.0, first=True),
    Op("split (repeated)", "flatten", 2.0, flax_as="split (first)"),
    Op("state (repeated)", "flatten", 2.0, flax_as="state (first)"),
    Op("graphdef (repeated)", "flatten", 2.0, flax_as="graphdef (first)"),
    Op("merge(graphdef, state)", "unflatten", 10.0),
    Op("update (fresh Variables)", "flatten", 10.0),
    Op("update (own Variables)", "flatten"),
    Op("clone", "flatten"),
]


def _cache_clear() -> Callable[[], Any] | None:
    """refax's flatten-cache clear, or None when refax has no (findable) cache."""
    try:
        cache = importlib.import_module("refax._graph._cache")
    except ImportError:
        return None
    return getattr(cache, "clear", None)


def _op_fns(nnx: Any, Model: type, key: jax.Array) -> dict[str, Callable[[], Any]]:
    """The timed callables of every row for one library."""
    inits = preset_inits()

    def construct_random() -> Any:
        m = Model(NUM_BLOCKS, WIDTH, key=key)
        m.blocks[-1].norm.bias[...].block_until_ready()  # CPU stream is in order
        return m

    def construct_preset() -> Any:
        return Model(NUM_BLOCKS, WIDTH, inits=inits)

    model = Model(NUM_BLOCKS, WIDTH, key=key)
    graphdef, state = nnx.split(model)
    fresh = jax.tree.map(lambda x: x, nnx.state(model))  # new Variables, as a jitted step returns
    own = nnx.state(model)
    return {
        "construct (jax.random init)": construct_random,
        "construct (preset arrays)": construct_preset,
        "split (first)": lambda: nnx.split(model),
        "state (first)": lambda: nnx.state(model),
        "graphdef (first)": lambda: nnx.graphdef(model),
        "split (repeated)": lambda: nnx.split(model),
        "state (repeated)": lambda: nnx.state(model),
        "graphdef (repeated)": lambda: nnx.graphdef(model),
        "merge(graphdef, state)": lambda: nnx.merge(graphdef, state),
        "update (fresh Variables)": lambda: nnx.update(model, fresh),
        "update (own Variables)": lambda: nnx.update(model, own),
        "clone": lambda: nnx.clone(model),
        "_model": lambda: model,
    }


def _ratio(a: Timing | None, b: Timing | None) -> float | None:
    return a.median / b.median if a is not None and b is not None else None


def run(settings: Settings) -> SuiteResult:
    import flax
    import flax.nnx as fnnx

    import refax

    key = jax.random.key(0)
    libs = {"refax": refax, "flax": fnnx}
    fns = {name: _op_fns(lib, make_model_classes(lib)[3], key) for name, lib in libs.items()}
    clear_fn = _cache_clear()
    refax_model = fns["refax"]["_model"]()
    clear = (lambda: clear_fn(refax_model)) if clear_fn is not None else None

    tree = pure_dict(refax_model)
    leaves, treedef = jax.tree.flatten(tree)
    n_leaves = len(leaves)
    jobs: dict[tuple[str, str], Any] = {
        ("limit", "flatten"): (lambda: jax.tree.flatten(tree), None),
        ("limit", "unflatten"): (lambda: jax.tree.unflatten(treedef, leaves), None),
    }
    for op in OPS:
        jobs["refax", op.name] = (fns["refax"][op.name], clear if op.first else None)
        if op.flax_as is None:
            jobs["flax", op.name] = (fns["flax"][op.name], None)
    timings = measure_interleaved(jobs, settings)
    for op in OPS:
        if op.flax_as is not None:
            timings["flax", op.name] = timings["flax", op.flax_as]
    limits = {name: timings["limit", name] for name in ("flatten", "unflatten")}

    headers = ["op", "refax", "flax", "limit", "refax/limit", "flax/limit", "refax/flax"]
    headers += ["target", "refax"]
    rows: list[list[str]] = []
    failed: list[str] = []
    for op in OPS:
        r, f = timings["refax", op.name], timings["flax", op.name]
        lim = limits[op.limit] if op.limit else None
        if op.target is None:
            target, status = "-", "info"
        else:
            measured = _ratio(r, f) if op.vs_flax else _ratio(r, lim)
            target = f"refax/flax <= {op.target:g}" if op.vs_flax else f"<= {op.target:g}x"
            status = "PASS" if measured is not None and measured <= op.target else "FAIL"
            if status == "FAIL":
                failed.append(f"graph_ops: {op.name} ({fmt_ratio(measured)}, target {target})")
        rows.append(
            [
                op.name,
                fmt_time(r.median),
                fmt_time(f.median),
                fmt_time(lim.median) if lim else "-",
                fmt_ratio(_ratio(r, lim)),
                fmt_ratio(_ratio(f, lim)),
                fmt_ratio(_ratio(r, f)),
                target,
                status,
            ]
        )
    for name in ("flatten", "unflatten"):
        rows.append([f"limit: jax.tree.{name}", "-", "-", fmt_time(limits[name].median)])
        rows[-1] += ["-"] * (len(headers) - len(rows[-1]))

    shared = {("flax", op.name) for op in OPS if op.flax_as is not None}
    noisy = [
        f"{lib} {op}"
        for (lib, op), t in timings.items()
        if (lib, op) not in shared and t.spread > 0.25 and t.repeats >= 4
    ]
    notes = [
        f"model: {NUM_BLOCKS} blocks x (Linear + LayerNorm), width {WIDTH}: {n_leaves} Params "
        f"(flax {flax.__version__} on the same layer code)",
        "limit = jax.tree.flatten (walk rows) / jax.tree.unflatten (merge) of a plain nested "
        f"dict of the same {n_leaves} arrays",
        "first = refax flatten cache cleared before every timed call; repeated = unchanged "
        "model, cache warm; flax has no walk cache (its first == repeated, one measurement)",
        "update (fresh Variables): a State of new Variable objects (jax.tree.map identity), as "
        "returned by a jitted step; update (own Variables): the model's own State",
        "construct (preset arrays): initializers return preallocated arrays, so only Module / "
        "Variable creation is timed",
    ]
    if settings.rounds > 1:
        notes.append(
            f"each figure pools {settings.rounds} interleaved rounds (median of "
            f"{min(t.repeats for t in timings.values())}-"
            f"{max(t.repeats for t in timings.values())} repeats)"
        )
    if clear is None:
        notes.append("WARNING: refax._graph._cache.clear not found: 'first' rows may be cached")
    if noisy:
        notes.append("noisy (IQR > 25% of median): " + ", ".join(noisy))
    return SuiteResult(TITLE, headers, rows, notes, failed)
