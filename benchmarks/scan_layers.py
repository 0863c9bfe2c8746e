"""scan over layers: a 16-layer stack created by ``nnx.vmap`` and applied by ``nnx.scan``.

The model is the scan-over-layers pattern of basics.md: ``nnx.vmap`` creates 16 stacked
Linear+LayerNorm blocks, and a training step under ``nnx.jit`` runs them with ``nnx.scan``
(``in_axes=(0, nnx.Carry)``), takes gradients with ``nnx.grad`` and applies SGD through
``nnx.Optimizer``. The limit is the same step written by hand: ``jax.lax.scan`` over a dict of
stacked arrays inside ``jax.jit`` with optax. Both are timed per step (blocked), side by side.
Target: refax at most 1.2x the hand-written step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from _timing import Settings, SuiteResult, fmt_ratio, fmt_time, measure_interleaved

TITLE = "nnx.scan over a vmap-created 16-layer stack vs jax.lax.scan"
LAYERS, WIDTH, BATCH = 16, 64, 32
TARGET = 1.2


def _refax_step() -> Any:
    from refax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
            self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return x + jnp.tanh(self.norm(self.linear(x)))

    @nnx.vmap
    def make_stack(rngs: nnx.Rngs) -> Block:
        return Block(rngs)

    stack = make_stack(nnx.Rngs(0).split(LAYERS))
    optimizer = nnx.Optimizer(stack, optax.sgd(1e-3), wrt=nnx.Param)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def forward(block: Block, x: jax.Array) -> jax.Array:
        return block(x)

    @nnx.jit
    def step(stack: Block, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
        def loss_fn(stack: Block) -> jax.Array:
            return jnp.mean((forward(stack, x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(stack)
        optimizer.update(stack, grads)
        return loss

    x, y = jnp.ones((BATCH, WIDTH)), jnp.zeros((BATCH, WIDTH))
    return lambda: jax.block_until_ready(step(stack, optimizer, x, y))


def _pure_step() -> Any:
    keys = jax.random.split(jax.random.key(0), LAYERS)
    init = jax.nn.initializers.lecun_normal()
    params = {
        "kernel": jax.vmap(lambda k: init(k, (WIDTH, WIDTH)))(keys),
        "bias": jnp.zeros((LAYERS, WIDTH)),
        "scale": jnp.ones((LAYERS, WIDTH)),
        "shift": jnp.zeros((LAYERS, WIDTH)),
    }
    tx = optax.sgd(1e-3)
    state = [params, tx.init(params)]

    def block(x: jax.Array, p: dict) -> tuple[jax.Array, None]:
        h = x @ p["kernel"] + p["bias"]
        mean = h.mean(-1, keepdims=True)
        var = h.var(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + 1e-6) * p["scale"] + p["shift"]
        return x + jnp.tanh(h), None

    @jax.jit
    def step(params: dict, opt_state: Any, x: jax.Array, y: jax.Array):
        def loss_fn(params: dict) -> jax.Array:
            out, _ = jax.lax.scan(block, x, params)
            return jnp.mean((out - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    x, y = jnp.ones((BATCH, WIDTH)), jnp.zeros((BATCH, WIDTH))

    def call() -> None:
        state[0], state[1], loss = step(state[0], state[1], x, y)
        jax.block_until_ready(loss)

    return call


def run(settings: Settings) -> SuiteResult:
    jobs = {"refax": (_refax_step(), None), "pure": (_pure_step(), None)}
    timings = measure_interleaved(jobs, settings)
    refax_t, pure_t = timings["refax"].median, timings["pure"].median
    ratio = refax_t / pure_t
    status = "PASS" if ratio <= TARGET else "FAIL"
    rows = [
        [
            "refax nnx.jit(vmap stack + nnx.scan)",
            fmt_time(refax_t),
            fmt_ratio(ratio),
            f"<= {TARGET}x",
            status,
        ],
        ["jax.jit + jax.lax.scan (limit)", fmt_time(pure_t), "1.00x", "-", "-"],
    ]
    return SuiteResult(
        title=TITLE,
        headers=["step", "time", "/limit", "target", "status"],
        rows=rows,
        notes=[f"{LAYERS} blocks of Linear({WIDTH}) + LayerNorm, batch {BATCH}, SGD"],
        failed=[] if status == "PASS" else [f"scan_layers ({ratio:.2f}x, target <= {TARGET}x)"],
    )
