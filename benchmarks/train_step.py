"""A small training step: refax.jit vs a functional jax.jit loop vs pure JAX vs flax.nnx.

The model is the one of the reference implementation's performance guide, stacked: ``depth``
blocks of Linear(64, 64) -> BatchNorm(64) -> Dropout(0.1) -> relu, then a final Linear(64, 64);
batch 32, MSE loss, Adam(1e-3). One step takes the gradient of the loss with respect to the
Params, applies Adam, updates the BatchNorm running statistics and advances the dropout stream.
Arrays are small on purpose: at low depth a step is mostly framework overhead.

Variants, each on its own copy of the same initial state (so every one runs the same numbers):

* ``pure JAX`` (the limit): a hand-written ``jax.jit`` step over plain dicts of arrays
  (params, batch stats, the dropout key and counter) with ``jax.value_and_grad`` and optax;
* ``refax.jit``: ``@refax.jit def train_step(model, optimizer, rngs, x, y)`` with
  ``refax.value_and_grad`` and ``optimizer.update(model, grads)``, objects passed every call;
* ``refax functional``: ``graphdef, state = refax.split((model, optimizer, rngs))`` once, then
  a ``jax.jit`` step that merges, runs the same ``train_step`` body and splits again (the
  functional pattern of the docs);
* ``flax nnx.jit`` and ``flax cached_partial``: the same model code on ``flax.nnx``.

Every timed call blocks on the loss (all outputs of a step come from one executable). In full
mode each step figure pools 24 short rounds in which the variants take turns (``STEP_ROUNDS``),
so a swing of the machine's speed hits every variant alike. The
other tables time a first call (trace + compile) of a fresh jitted function and its
``.lower()`` (trace + lowering, no compile), and ``refax.eval_shape`` of a model constructor
against eager construction.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import Settings, SuiteResult, Table, Timing, fmt_ratio, fmt_time, measure_interleaved

TITLE = "train step (Linear-BatchNorm-Dropout blocks + Adam): refax.jit vs jax.jit vs flax.nnx"
DEPTHS = (1, 4, 16, 64)
WIDTH = 64
BATCH = 32
RATE = 0.1
LR = 1e-3
MOMENTUM = 0.99  # BatchNorm defaults (the same in refax and flax)
EPSILON = 1e-5
STEP_TARGET = 1.2  # refax.jit / pure JAX, per step
FIRST_TARGET = 1.5  # refax / pure JAX, first call and trace
EVAL_SHAPE_TARGET = 2.0  # refax.eval_shape / eager construction
EVAL_SHAPE_DEPTH = 166  # 6 Variables per block + 2: 998 Variables
STEP_ROUNDS = 24  # interleaved rounds per step figure (full mode)
CHECK_STEPS = 2  # steps compared across variants before timing (see Setup.check)
CHECK_RTOL = 1e-3

VARIANTS = ("pure", "refax", "functional", "flax", "flax_cached")
LABELS = {
    "pure": "pure JAX",
    "refax": "refax.jit",
    "functional": "refax functional",
    "flax": "flax nnx.jit",
    "flax_cached": "flax cached_partial",
}


# -- the model and step, written once against the NNX API ------------------------------------
def make_model_class(nnx: ModuleType) -> type:
    """``Model(depth, rngs=...)`` for the library module ``nnx`` (refax or flax.nnx)."""
    wrap_list = nnx.List if nnx.__name__.startswith("flax") else list

    class Block(nnx.Module):
        def __init__(self, width: int, *, rngs: Any):
            self.linear = nnx.Linear(width, width, rngs=rngs)
            self.bn = nnx.BatchNorm(width, rngs=rngs)
            self.dropout = nnx.Dropout(RATE)

        def __call__(self, x: jax.Array, rngs: Any) -> jax.Array:
            return jax.nn.relu(self.dropout(self.bn(self.linear(x)), rngs=rngs))

    class Model(nnx.Module):
        def __init__(self, depth: int, *, rngs: Any):
            self.blocks = wrap_list([Block(WIDTH, rngs=rngs) for _ in range(depth)])
            self.out = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

        def __call__(self, x: jax.Array, rngs: Any) -> jax.Array:
            for block in self.blocks:
                x = block(x, rngs)
            return self.out(x)

    return Model


def make_train_step(nnx: ModuleType) -> Callable[..., Any]:
    """A fresh ``train_step(model, optimizer, rngs, x, y) -> loss`` function object."""

    def loss_fn(model: Any, rngs: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean((model(x, rngs) - y) ** 2)

    def train_step(model: Any, optimizer: Any, rngs: Any, x: jax.Array, y: jax.Array) -> Any:
        loss, grads = nnx.value_and_grad(loss_fn)(model, rngs, x, y)
        optimizer.update(model, grads)
        return loss

    return train_step


def make_functional_step(nnx: ModuleType) -> Callable[..., Any]:
    """A fresh ``jax.jit`` step over ``(graphdef, state)`` (merge, step, split)."""
    body = make_train_step(nnx)

    @jax.jit
    def step(graphdef: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any]:
        model, optimizer, rngs = nnx.merge(graphdef, state)
        loss = body(model, optimizer, rngs, x, y)
        return loss, nnx.state((model, optimizer, rngs))

    return step


def make_pure_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
    """A fresh hand-written step over plain dicts: the same computation as the NNX step."""
    keep = 1.0 - RATE

    def loss_fn(params: dict, stats: list, key: jax.Array, count: jax.Array, x, y):
        new_stats = []
        for p, s in zip(params["blocks"], stats):
            h = jnp.dot(x, p["kernel"]) + p["bias"]
            mean = h.mean(0)
            var = jnp.maximum(0.0, (h * h).mean(0) - mean * mean)
            new_stats.append(
                {
                    "mean": MOMENTUM * s["mean"] + (1 - MOMENTUM) * mean,
                    "var": MOMENTUM * s["var"] + (1 - MOMENTUM) * var,
                }
            )
            h = (h - mean) * (jax.lax.rsqrt(var + EPSILON) * p["scale"]) + p["bn_bias"]
            mask = jax.random.bernoulli(jax.random.fold_in(key, count), keep, h.shape)
            count = count + 1
            x = jax.nn.relu(jax.lax.select(mask, h / keep, jnp.zeros_like(h)))
        out = jnp.dot(x, params["out"]["kernel"]) + params["out"]["bias"]
        return jnp.mean((out - y) ** 2), (new_stats, count)

    @jax.jit
    def step(params, opt_state, stats, key, count, opt_step, x, y):
        (loss, (stats, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, stats, key, count, x, y
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return loss, (params, opt_state, stats, key, count, opt_step + 1)

    return step


def pure_state(model: Any, rngs: Any, tx: optax.GradientTransformation) -> tuple:
    """The pure step's carry, read from a refax ``model``/``rngs`` (same initial numbers)."""
    blocks = [
        {
            "kernel": b.linear.kernel[...],
            "bias": b.linear.bias[...],
            "scale": b.bn.scale[...],
            "bn_bias": b.bn.bias[...],
        }
        for b in model.blocks
    ]
    params = {
        "blocks": blocks,
        "out": {"kernel": model.out.kernel[...], "bias": model.out.bias[...]},
    }
    stats = [{"mean": b.bn.mean[...], "var": b.bn.var[...]} for b in model.blocks]
    key, count = rngs.dropout.key[...], rngs.dropout.count[...]
    return params, tx.init(params), stats, key, count, jnp.zeros((), jnp.uint32)


def count_variables(nnx: ModuleType, node: Any) -> int:
    return len(jax.tree.leaves(nnx.state(node)))


# -- one depth: the five variants, ready to call ------------------------------------------------
class Setup:
    """Models, optimizers, streams and jitted steps of every variant at one depth."""

    def __init__(self, depth: int, refax: ModuleType, fnnx: ModuleType | None):
        self.depth = depth
        kx, ky = jax.random.split(jax.random.key(42))
        self.x = jax.random.normal(kx, (BATCH, WIDTH))
        self.y = jax.random.normal(ky, (BATCH, WIDTH))
        self.tx = optax.adam(LR)
        self.calls: dict[str, Callable[[], jax.Array]] = {}

        # pure JAX, from the initial numbers of a refax model
        m, r = self._objects(refax)[::2]
        carry = [pure_state(m, r, self.tx)]
        pure_step = make_pure_step(self.tx)

        def pure_call() -> jax.Array:
            loss, carry[0] = pure_step(*carry[0], self.x, self.y)
            return loss.block_until_ready()

        self.calls["pure"] = pure_call

        # refax.jit, objects passed on every call
        objs = self._objects(refax)
        refax_step = refax.jit(make_train_step(refax))
        self.refax_objects = objs
        self.refax_step = refax_step
        self.calls["refax"] = lambda: refax_step(*objs, self.x, self.y).block_until_ready()

        # functional: split once, jax.jit over (graphdef, state)
        graphdef, state = refax.split(self._objects(refax))
        fstate = [state]
        fstep = make_functional_step(refax)

        def functional_call() -> jax.Array:
            loss, fstate[0] = fstep(graphdef, fstate[0], self.x, self.y)
            return loss.block_until_ready()

        self.calls["functional"] = functional_call

        if fnnx is not None:
            fobjs = self.flax_objects = self._objects(fnnx)
            flax_step = fnnx.jit(make_train_step(fnnx))
            self.calls["flax"] = lambda: flax_step(*fobjs, self.x, self.y).block_until_ready()
            cobjs = self._objects(fnnx)
            cached = fnnx.cached_partial(fnnx.jit(make_train_step(fnnx)), *cobjs)
            self.calls["flax_cached"] = lambda: cached(self.x, self.y).block_until_ready()

        self.n_variables = count_variables(refax, objs[0])  # the model's
        self.n_leaves = count_variables(refax, objs)  # model + optimizer + rngs

    def _objects(self, nnx: ModuleType) -> tuple[Any, Any, Any]:
        model = make_model_class(nnx)(self.depth, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, self.tx, wrt=nnx.Param)
        return model, optimizer, nnx.Rngs(dropout=1)

    def check(self) -> dict[str, float]:
        """Runs CHECK_STEPS steps of every variant (also the warm-up, i.e. the compile).

        Returns the largest relative difference of each variant's losses to the pure-JAX ones.
        Only the first steps are compared: the Linear biases feed a BatchNorm, so their exact
        gradient is zero and what is computed is rounding noise, which Adam scales up to
        lr-sized updates; at depth 64 the runs drift apart from the third step on.
        """
        losses = {}
        for name, call in self.calls.items():
            losses[name] = np.array([float(call()) for _ in range(CHECK_STEPS)])
        ref = losses["pure"]
        return {
            name: float(np.max(np.abs(v - ref) / np.maximum(np.abs(ref), 1e-12)))
            for name, v in losses.items()
        }


# -- first call / trace ------------------------------------------------------------------------
_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}


class _PhaseRecorder:
    """Sums the durations jax reports for top-level tracing, lowering and compiling."""

    def __init__(self) -> None:
        self.active = False
        self.totals: dict[str, float] = {}

    def __call__(self, event: str, duration: float, **kwargs: Any) -> None:
        phase = _EVENTS.get(event)
        if self.active and phase is not None:
            self.totals[phase] = self.totals.get(phase, 0.0) + duration


_RECORDER = _PhaseRecorder()


def _install_recorder() -> bool:
    monitoring = getattr(jax, "monitoring", None)
    register = getattr(monitoring, "register_event_duration_secs_listener", None)
    if register is None:  # pragma: no cover - very old jax
        return False
    if not getattr(_RECORDER, "installed", False):
        register(_RECORDER)
        _RECORDER.installed = True  # type: ignore[attr-defined]
    return True


def first_call_fns(
    s: Setup, refax: ModuleType, fnnx: ModuleType | None
) -> tuple[dict[str, Callable[[], Any]], dict[str, Callable[[], Any]]]:
    """``(first calls, lowers)``: per variant, a callable that builds a fresh jitted function
    and calls it once (blocked), and one that builds a fresh jitted function and lowers it."""
    x, y = s.x, s.y
    robjs = s.refax_objects
    carry = pure_state(*robjs[::2], s.tx)
    first: dict[str, Callable[[], Any]] = {
        "pure": lambda: jax.block_until_ready(make_pure_step(s.tx)(*carry, x, y)),
        "refax": lambda: refax.jit(make_train_step(refax))(*robjs, x, y).block_until_ready(),
    }
    lower: dict[str, Callable[[], Any]] = {
        "pure": lambda: make_pure_step(s.tx).lower(*carry, x, y),
        "refax": lambda: refax.jit(make_train_step(refax)).lower(*robjs, x, y),
    }
    if fnnx is not None:
        fobjs = s.flax_objects
        first["flax"] = lambda: fnnx.jit(make_train_step(fnnx))(*fobjs, x, y).block_until_ready()
        lower["flax"] = lambda: fnnx.jit(make_train_step(fnnx)).lower(*fobjs, x, y)
    return first, lower


def time_phases(fn: Callable[[], Any]) -> dict[str, float]:
    """One call of ``fn``: its wall time (``total``) and jax's trace / lower / compile times."""
    gc.collect()
    gc.disable()
    _RECORDER.totals = {}
    _RECORDER.active = True
    try:
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
    finally:
        _RECORDER.active = False
        gc.enable()
    return {"total": total, **_RECORDER.totals}


def measure_phases(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[tuple[str, str], float]:
    """Median over ``repeats`` interleaved rounds of each variant's wall time and phases."""
    samples: dict[tuple[str, str], list[float]] = {}
    order = list(fns)
    for r in range(repeats):
        for name in order if r % 2 == 0 else reversed(order):
            for phase, t in time_phases(fns[name]).items():
                samples.setdefault((name, phase), []).append(t)
    return {k: statistics.median(v) for k, v in samples.items()}


# -- eval_shape --------------------------------------------------------------------------------
def measure_eval_shape(
    refax: ModuleType, fnnx: ModuleType | None, repeats: int
) -> tuple[dict[tuple[str, str], float], int]:
    """Median times of eager and abstract construction, and the model's Variable count."""
    depth = EVAL_SHAPE_DEPTH
    libs = {"refax": refax}
    if fnnx is not None:
        libs["flax"] = fnnx
    models = {name: make_model_class(lib) for name, lib in libs.items()}

    def eager(name: str) -> Callable[[], Any]:
        def build() -> Any:
            m = models[name](depth, rngs=libs[name].Rngs(0))
            return m.out.bias[...].block_until_ready()  # the CPU stream runs in order

        return build

    def abstract(name: str) -> Callable[[], Any]:
        return lambda: libs[name].eval_shape(lambda: models[name](depth, rngs=libs[name].Rngs(0)))

    n_vars = count_variables(refax, models["refax"](depth, rngs=refax.Rngs(0)))
    jobs: dict[tuple[str, str], Callable[[], Any]] = {}
    for name in libs:
        jobs[name, "eager"] = eager(name)
        if name == "flax" or hasattr(refax, "eval_shape"):
            jobs[name, "eval_shape"] = abstract(name)
    for key, fn in jobs.items():  # warm-up: jax.random kernels, jit caches
        if key != ("flax", "eval_shape"):  # seconds per call, and nothing to warm up
            fn()
    samples: dict[tuple[str, str], list[float]] = {k: [] for k in jobs}
    order = list(jobs)
    for r in range(repeats):
        for key in order if r % 2 == 0 else reversed(order):
            samples[key].append(time_phases(jobs[key])["total"])
    return {k: statistics.median(v) for k, v in samples.items()}, n_vars


# -- the suite ---------------------------------------------------------------------------------
def _cell(t: float | None, limit: float | None) -> str:
    if t is None or limit is None:
        return "-"
    return f"{fmt_time(t)} ({fmt_ratio(t / limit)})"


def _get(d: dict, *key: str) -> float | None:
    return d.get(key)


def first_call_rows(
    s: Setup, refax: ModuleType, fnnx: ModuleType | None, quick: bool, failed: list[str]
) -> list[list[str]]:
    """The rows of the first-call table at one depth; appends failed targets to ``failed``."""
    depth = s.depth
    first_fns, lower_fns = first_call_fns(s, refax, fnnx)
    if depth > 16:  # ~10 s of XLA compile per first call: flax's is left out
        first_fns.pop("flax", None)
    fc: dict[tuple[str, str], float] = {}
    if not (quick and depth > 4):
        fc = measure_phases(first_fns, 3 if depth <= 4 and not quick else 1)
    lw = measure_phases(lower_fns, 3 if quick or depth > 16 else 5)
    figures = [("first call", fc, "total"), ("trace", lw, "trace")]
    figures += [("trace + lower", lw, "total"), ("compile", fc, "compile")]
    rows = []
    for label, source, phase in figures:
        p, r, f = (source.get((v, phase)) for v in ("pure", "refax", "flax"))
        if p is None:
            continue
        target, status = "-", "info"
        if label in ("first call", "trace") and r is not None:
            target = f"<= {FIRST_TARGET:g}x"
            status = "PASS" if r / p <= FIRST_TARGET else "FAIL"
            if status == "FAIL":
                failed.append(
                    f"train_step: refax.jit {label} / pure jax.jit at depth {depth}: "
                    f"{fmt_ratio(r / p)} (target <= {FIRST_TARGET:g}x)"
                )
        rows.append([str(depth), label, fmt_time(p), _cell(r, p), _cell(f, p), target, status])
    return rows


def run(settings: Settings) -> SuiteResult:
    import refax

    try:
        import flax
        import flax.nnx as fnnx
    except ImportError:  # pragma: no cover - flax comes with the bench extra
        flax, fnnx = None, None

    quick = settings.rounds == 1
    step_depths = DEPTHS[:-1] if quick else DEPTHS
    # Many short interleaved rounds (as benchmarks/step_ab.py takes): this machine's speed
    # swings within seconds, and a ratio of a few percent needs each swing to hit every variant.
    step_settings = settings if quick else replace(settings, rounds=STEP_ROUNDS, target_s=1.0)
    _install_recorder()

    headers = ["depth", "Variables"] + [LABELS[v] for v in VARIANTS]
    headers += ["target (refax.jit)", "refax"]
    rows: list[list[str]] = []
    first_headers = ["depth", "phase", "pure jax.jit", "refax.jit", "flax nnx.jit", "target"]
    first_headers += ["refax"]
    first_rows: list[list[str]] = []
    failed: list[str] = []
    check_notes: list[str] = []
    spreads: list[str] = []

    for depth in step_depths:
        s = Setup(depth, refax, fnnx)
        errors = s.check()
        worst = max(errors.values())
        check_notes.append(f"{depth}: {worst:.1e}")
        if worst > CHECK_RTOL:
            bad = [f"{LABELS[k]} {v:.1e}" for k, v in errors.items() if v > CHECK_RTOL]
            check_notes[-1] += f" (MISMATCH: {', '.join(bad)})"
            failed.append(f"train_step: variants disagree at depth {depth}: {', '.join(bad)}")
        timings: dict[str, Timing] = measure_interleaved(
            {v: (c, None) for v, c in s.calls.items()}, step_settings
        )
        med = {v: t.median for v, t in timings.items()}
        ratio = med["refax"] / med["pure"]
        status = "PASS" if ratio <= STEP_TARGET else "FAIL"
        if status == "FAIL":
            failed.append(
                f"train_step: refax.jit / pure JAX at depth {depth}: {fmt_ratio(ratio)} "
                f"(target <= {STEP_TARGET:g}x)"
            )
        row = [str(depth), f"{s.n_variables} / {s.n_leaves}"]
        row += [_cell(med.get(v), med["pure"]) for v in VARIANTS]
        row += [f"<= {STEP_TARGET:g}x", status]
        rows.append(row)
        spreads += [
            f"{LABELS[v]} @{depth}"
            for v, t in timings.items()
            if t.spread > 0.25 and t.repeats >= 4
        ]

        first_rows += first_call_rows(s, refax, fnnx, quick, failed)
        del s

    es, n_vars = measure_eval_shape(refax, fnnx if not quick else None, 3)
    es_headers = ["library", "eager construction", "eval_shape", "eval_shape/eager"]
    es_headers += ["target", "status"]
    es_rows = []
    for lib in ("refax", "flax"):
        eager, abstract = _get(es, lib, "eager"), _get(es, lib, "eval_shape")
        if eager is None:
            continue
        if abstract is None:
            es_rows.append([lib, fmt_time(eager), "n/a", "n/a", "-", "n/a"])
            continue
        ratio = abstract / eager
        target, status = "-", "info"
        if lib == "refax":
            target = f"<= {EVAL_SHAPE_TARGET:g}x"
            status = "PASS" if ratio <= EVAL_SHAPE_TARGET else "FAIL"
            if status == "FAIL":
                failed.append(
                    f"train_step: refax.eval_shape / eager construction {fmt_ratio(ratio)} "
                    f"(target <= {EVAL_SHAPE_TARGET:g}x)"
                )
        es_rows.append([lib, fmt_time(eager), fmt_time(abstract), fmt_ratio(ratio)])
        es_rows[-1] += [target, status]

    notes = [
        f"model: depth x (Linear({WIDTH},{WIDTH}) -> BatchNorm -> Dropout({RATE}) -> relu) -> "
        f"Linear({WIDTH},{WIDTH}); batch {BATCH}; MSE; optax.adam({LR}); flax "
        f"{flax.__version__ if flax else 'not installed'} runs the same model code",
        "step table: median time per step (blocked on the loss), in brackets the ratio to the "
        "pure-JAX step (a hand-written jax.jit step over dicts: the limit); Variables: the "
        "model's / all those a step passes through jit (model + optimizer + rngs)",
        "refax functional = jax.jit(merge -> train_step -> state) over refax.split((model, "
        "optimizer, rngs)); flax cached_partial = nnx.cached_partial(nnx.jit(train_step), "
        "model, optimizer, rngs)",
        f"the variants compute the same numbers: largest relative difference of the loss to "
        f"pure JAX over the first {CHECK_STEPS} steps, per depth: " + "; ".join(check_notes),
        "first call: a fresh jitted function object called once (wall time, blocked: trace + "
        "lower + compile + run), median of "
        f"{'1 (not timed at depth 16)' if quick else '3 (1 at depths 16 and 64)'}; flax's not "
        "timed at depth 64 (compile time, the same HLO); compile: the XLA compile within it (as "
        "jax.monitoring reports it; the same HLO for the three, so its ratio is noise); trace "
        "+ lower: wall time of .lower() on a fresh jitted function (no compile; refax's and "
        "flax's graph work included), trace: the top-level trace to a jaxpr within it (jax."
        f"monitoring), median of {'3' if quick else '5 (3 at depth 64)'}",
        f"eval_shape: refax.eval_shape(lambda: Model({EVAL_SHAPE_DEPTH}, rngs=Rngs(0))) "
        f"({n_vars} Variables) vs Model(...) built eagerly (jax.random init, blocked)",
    ]
    if quick:
        notes.append(
            "quick mode: depth 64 (~10 s of XLA compile per variant) is left out, and so are "
            "first calls at depth 16 and flax's eval_shape"
        )
    if step_settings.rounds > 1:
        notes.append(f"step figures pool {step_settings.rounds} interleaved rounds")
    if spreads:
        notes.append("noisy (IQR > 25% of median): " + ", ".join(spreads))
    tables = [
        Table("first call of a fresh jitted step, and its phases", first_headers, first_rows),
        Table("abstract init (eval_shape) vs eager construction", es_headers, es_rows),
    ]
    return SuiteResult(TITLE, headers, rows, notes, failed, tables)


# -- profiling helper: python benchmarks/train_step.py --profile DEPTH ---------------------------
def profile(depth: int, calls: int, top: int) -> None:
    """cProfile of ``calls`` blocked refax.jit steps at ``depth``, top functions by own time.

    The time of the compiled step itself shows up as the own time of the function that calls
    the ``jax.jit`` object (``JitWrapped.__call__``); everything else is Python overhead.
    """
    import cProfile
    import pstats

    import refax

    s = Setup(depth, refax, None)
    s.check()
    call, pure = s.calls["refax"], s.calls["pure"]
    for _ in range(20):
        call()
    per_call = {}
    for name, fn in (("pure JAX", pure), ("refax.jit", call)):
        per_call[name] = measure_interleaved({0: (fn, None)}, Settings())[0].median
    print(f"depth {depth}: " + ", ".join(f"{k} {fmt_time(v)}" for k, v in per_call.items()))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        call()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Profile the refax.jit train step.")
    parser.add_argument("--profile", type=int, default=1, metavar="DEPTH")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--top", type=int, default=20)
    ns = parser.parse_args()
    profile(ns.profile, ns.calls, ns.top)
