"""Tests for nnx.TrainState (refax/training/_train_state.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from refax import nnx


class TrainState(nnx.TrainState):
    batch_stats: nnx.State


class Model(nnx.Module):
    def __init__(self, *, rngs):
        self.linear = nnx.Linear(2, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x, train):
        return self.bn(self.linear(x), use_running_average=not train)


def make_state():
    graphdef, params, stats = nnx.split(Model(rngs=nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
    return TrainState.create(graphdef, params=params, tx=optax.sgd(0.5), batch_stats=stats)


def test_subclass_is_a_frozen_dataclass_pytree():
    state = make_state()
    assert [f.name for f in dataclasses.fields(state)][-1] == "batch_stats"
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.step = 3
    leaves, treedef = jax.tree.flatten(state)
    n_params = len(jax.tree.leaves(state.params))
    n_stats = len(jax.tree.leaves(state.batch_stats))
    assert len(leaves) == n_params + n_stats + 1  # + step; sgd keeps no state arrays
    back = jax.tree.unflatten(treedef, leaves)
    assert back.graphdef == state.graphdef and back.tx is state.tx


def test_apply_and_apply_gradients():
    state = make_state()
    x = jnp.ones((3, 2))
    y, (graphdef, new_state) = state.apply("params", "batch_stats")(x, train=True)
    assert y.shape == (3, 4) and graphdef == state.graphdef
    grads = jax.tree.map(jnp.ones_like, state.params)
    new = state.apply_gradients(grads, batch_stats=nnx.filter_state(new_state, nnx.BatchStat))
    assert int(new.step) == 1 and int(state.step) == 0
    np.testing.assert_allclose(
        new.params["linear"]["bias"][...], state.params["linear"]["bias"][...] - 0.5
    )
    with pytest.raises(TypeError, match="step"):
        state.apply("step")


def test_train_step_under_jit():
    state = make_state()

    @jax.jit
    def step(state, x):
        def loss(params):
            y, _ = state.apply(params, state.batch_stats)(x, train=False)
            return jnp.mean(y**2)

        grads = jax.grad(loss)(state.params)
        _, (_, updates) = state.apply("params", "batch_stats")(x, train=True)
        return state.apply_gradients(grads, batch_stats=nnx.filter_state(updates, nnx.BatchStat))

    new = step(state, jnp.ones((3, 2)))
    assert int(new.step) == 1
    new = step(new, jnp.ones((3, 2)))
    assert int(new.step) == 2


def test_static_field_in_subclass():
    class Tagged(nnx.TrainState):
        tag: str = nnx.static(default="run")

    graphdef, params = nnx.split(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), nnx.Param)
    s = Tagged.create(graphdef, params=params, tx=optax.sgd(0.1))
    assert "run" not in jax.tree.leaves(s) and jax.tree.structure(s) != jax.tree.structure(
        s.replace(tag="other")
    )
