"""Graph operations keep nothing alive: no reference cycles, no cache entry holding dead args.

With the cycle collector disabled, an object is freed only by reference counting; every test
here drops a model (or an argument) and checks through a weak reference that it is gone at
once. Any reference cycle created by a walk, a merge, a kept walk or a transform's per-call
bookkeeping would keep it alive (and, on an accelerator, its device memory with it).
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import jax
import jax.numpy as jnp
import pytest

from refax import nnx


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.layers = [nnx.Linear(4, 4, rngs=rngs)]

    def __call__(self, x):
        return self.layers[0](self.norm(self.linear(x)))


@contextlib.contextmanager
def no_cycle_collector():
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _loss(m, x):
    return jnp.sum(m(x) ** 2)


OPERATIONS = {
    "split": lambda m: nnx.split(m),
    "split_twice": lambda m: (nnx.split(m), nnx.split(m), nnx.split(m, nnx.Param, ...)),
    "state": lambda m: (nnx.state(m), nnx.state(m), nnx.state(m, nnx.BatchStat)),
    "graphdef": lambda m: (nnx.graphdef(m), nnx.graphdef(m)),
    "merge": lambda m: nnx.merge(*nnx.split(m)),
    "clone": lambda m: nnx.clone(m),
    "update": lambda m: nnx.update(m, nnx.state(m)),
    "iter_graph": lambda m: list(nnx.iter_graph(m)),
    "jit": lambda m: [nnx.jit(_loss)(m, jnp.ones((2, 4))) for _ in range(3)],
    "grad": lambda m: [nnx.grad(_loss)(m, jnp.ones((2, 4))) for _ in range(2)],
    "vmap": lambda m: nnx.vmap(lambda m, x: jnp.sum(m.linear(x)), in_axes=(None, 0))(
        m, jnp.ones((3, 2, 4))
    ),
    "scan": lambda m: nnx.scan(
        lambda m, x: (m, _loss(m, x)), in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0)
    )(m, jnp.ones((3, 2, 4))),
}


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_dropped_model_is_freed_by_reference_counting(name):
    operation = OPERATIONS[name]
    operation(Block(nnx.Rngs(0)))  # compile outside the measured part
    with no_cycle_collector():
        m = Block(nnx.Rngs(0))
        refs = [weakref.ref(m), weakref.ref(m.linear), weakref.ref(m.linear.kernel)]
        result = operation(m)
        del m, result
        alive = [r() for r in refs if r() is not None]
        assert alive == [], f"{name} left {[type(a).__name__ for a in alive]} alive"


def test_jitted_step_keeps_no_old_argument_alive():
    class Batch(nnx.Module):
        def __init__(self, x):
            self.x = nnx.Variable(x)

    @nnx.jit
    def step(model, batch, extra):
        model.norm.mean[...] += jnp.mean(batch.x[...]) + extra[...]
        return model(batch.x[...])

    model = Block(nnx.Rngs(0))
    dead = []
    with no_cycle_collector():
        for i in range(12):
            batch = Batch(jnp.full((2, 4), float(i)))
            extra = nnx.Variable(jnp.array(float(i)))  # a Variable passed directly
            step(model, batch, extra)
            dead += [weakref.ref(batch), weakref.ref(batch.x), weakref.ref(extra)]
            del batch, extra
        assert [r for r in dead if r() is not None] == []


def test_live_arrays_stay_bounded_in_a_loop():
    def one_round():
        m = Block(nnx.Rngs(0))
        nnx.split(m)
        nnx.split(m)
        nnx.clone(m)
        nnx.jit(_loss)(m, jnp.ones((2, 4)))
        return len(jax.live_arrays())

    one_round()  # warm up: compiled executables and constants
    with no_cycle_collector():
        before = len(jax.live_arrays())
        counts = [one_round() for _ in range(6)]
        after = len(jax.live_arrays())
    assert after <= before + 2, (before, counts, after)
    assert max(counts) - min(counts) <= 2, counts


def test_replaced_submodule_is_released_by_the_next_walk():
    model = Block(nnx.Rngs(0))
    step = nnx.jit(_loss)
    step(model, jnp.ones((2, 4)))
    step(model, jnp.ones((2, 4)))
    with no_cycle_collector():
        old = weakref.ref(model.linear)
        model.linear = nnx.Linear(4, 4, rngs=nnx.Rngs(1))
        step(model, jnp.ones((2, 4)))  # the kept walk is stale: replaced, old one dropped
        nnx.split(model)
        nnx.split(model)
        assert old() is None
