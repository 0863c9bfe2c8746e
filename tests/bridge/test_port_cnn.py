"""Porting a Linen CNN to refax one submodule at a time: every stage computes the same
outputs, and trains to the same loss, as the all-Linen model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from refax import nnx
from refax.nnx import bridge

# The layers of the CNN: (name, Linen factory, refax factory)
LAYERS = [
    ("Conv_0", lambda: nn.Conv(4, (3, 3)), lambda: bridge.to_linen(nnx.Conv, 1, 4, (3, 3))),
    ("Conv_1", lambda: nn.Conv(8, (3, 3)), lambda: bridge.to_linen(nnx.Conv, 4, 8, (3, 3))),
    ("Dense_0", lambda: nn.Dense(16), lambda: bridge.to_linen(nnx.Linear, 8 * 2 * 2, 16)),
    ("Dense_1", lambda: nn.Dense(10), lambda: bridge.to_linen(nnx.Linear, 16, 10)),
]


class CNN(nn.Module):
    """The Linen CNN; the first ``ported`` layers are refax modules (through ToLinen)."""

    ported: int = 0

    def setup(self):
        for i, (name, linen_layer, refax_layer) in enumerate(LAYERS):
            setattr(self, name, refax_layer() if i < self.ported else linen_layer())

    def __call__(self, x):
        x = nn.avg_pool(nn.relu(self.Conv_0(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(self.Conv_1(x)), (2, 2), (2, 2))
        x = nn.relu(self.Dense_0(x.reshape(x.shape[0], -1)))
        return self.Dense_1(x)


class RefaxCNN(nnx.Module):
    """The finished port: a plain refax Module."""

    def __init__(self, rngs):
        self.Conv_0 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.Conv_1 = nnx.Conv(4, 8, (3, 3), rngs=rngs)
        self.Dense_0 = nnx.Linear(8 * 2 * 2, 16, rngs=rngs)
        self.Dense_1 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.Conv_0(x)), (2, 2), (2, 2))
        x = nnx.avg_pool(nnx.relu(self.Conv_1(x)), (2, 2), (2, 2))
        x = nnx.relu(self.Dense_0(x.reshape(x.shape[0], -1)))
        return self.Dense_1(x)


def _data():
    kx, ky = jax.random.split(jax.random.key(0))
    return jax.random.normal(kx, (8, 8, 8, 1)), jax.random.randint(ky, (8,), 0, 10)


def _loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _train_linen(model, params, x, labels, steps=3):
    tx = optax.sgd(0.1)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: _loss(model.apply({"params": p}, x), labels))(
            params
        )
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(loss)
    losses.append(_loss(model.apply({"params": params}, x), labels))
    return np.array(losses)


@functools.cache
def _reference():
    x, labels = _data()
    params = CNN().init(jax.random.key(1), x)["params"]
    return params, CNN().apply({"params": params}, x), _train_linen(CNN(), params, x, labels)


@pytest.mark.parametrize("ported", range(1, len(LAYERS) + 1))
def test_port_stage_matches_linen(ported):
    x, labels = _data()
    params, logits, losses = _reference()
    model = CNN(ported=ported)
    # the refax layers' variables have the Linen layers' names and shapes
    own = model.init(jax.random.key(1), x)["params"]
    assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, params)
    np.testing.assert_allclose(model.apply({"params": params}, x), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_train_linen(model, params, x, labels), losses, rtol=1e-5)


def test_finished_port_trains_like_linen():
    x, labels = _data()
    params, logits, losses = _reference()
    model = RefaxCNN(nnx.Rngs(0))
    nnx.update(model, jax.tree.map(jnp.asarray, params))  # the Linen params, same names
    np.testing.assert_allclose(model(x), logits, rtol=1e-5, atol=1e-5)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: _loss(m(x), labels))(model)
        optimizer.update(model, grads)
        return loss

    ours = [step(model, optimizer) for _ in range(3)] + [_loss(model(x), labels)]
    np.testing.assert_allclose(np.array(ours), losses, rtol=1e-5)
