"""Dropout: masks identical to the oracle's for the same keys, modes, gradients and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as F

from refax import nnx
from refax._rngs import Rngs
from refax.nn import Dropout

X = jnp.arange(1.0, 25.0).reshape(4, 6)


def test_constructor_rngs_match_oracle():
    ref_rngs, rngs = F.Rngs(0, dropout=3), Rngs(0, dropout=3)
    ref, mine = F.Dropout(0.3, rngs=ref_rngs), Dropout(0.3, rngs=rngs)
    # The layer keeps a fork of the stream: one key drawn from the dropout stream.
    assert int(rngs.dropout.count[...]) == int(ref_rngs.dropout.count[...]) == 1
    assert int(rngs.default.count[...]) == 0
    for _ in range(3):  # successive calls draw successive keys
        np.testing.assert_array_equal(ref(X), mine(X))


@pytest.mark.parametrize("broadcast_dims", [(), (0,), (-1,), (0, 1)])
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_call_rngs_match_oracle(broadcast_dims, rate):
    ref, mine = (
        F.Dropout(rate, broadcast_dims=broadcast_dims),
        Dropout(rate, broadcast_dims=broadcast_dims),
    )
    ref_rngs, rngs = F.Rngs(0, dropout=7), Rngs(0, dropout=7)
    np.testing.assert_array_equal(ref(X, rngs=ref_rngs), mine(X, rngs=rngs))
    np.testing.assert_array_equal(ref(X, rngs=ref_rngs.dropout), mine(X, rngs=rngs.dropout))
    for key in (jax.random.key(1), jax.random.PRNGKey(1)):
        np.testing.assert_array_equal(ref(X, rngs=key), mine(X, rngs=key))


def test_rng_collection_and_default_fallback_match_oracle():
    ref, mine = F.Dropout(0.5, rng_collection="noise"), Dropout(0.5, rng_collection="noise")
    np.testing.assert_array_equal(ref(X, rngs=F.Rngs(5)), mine(X, rngs=Rngs(5)))
    ref_rngs, rngs = F.Rngs(1, noise=2), Rngs(1, noise=2)
    np.testing.assert_array_equal(ref(X, rngs=ref_rngs), mine(X, rngs=rngs))
    assert int(rngs.noise.count[...]) == 1 and int(rngs.default.count[...]) == 0


def test_call_rngs_override_own_stream():
    mine = Dropout(0.5, rngs=Rngs(dropout=0))
    y1 = mine(X, rngs=jax.random.key(3))
    y2 = Dropout(0.5)(X, rngs=jax.random.key(3))
    np.testing.assert_array_equal(y1, y2)
    assert int(mine.rngs.count[...]) == 0


def test_reference_math_and_grads():
    rate, key = 0.25, jax.random.key(11)
    mask = jax.random.bernoulli(key, 1 - rate, X.shape)
    y = Dropout(rate)(X, rngs=key)
    np.testing.assert_allclose(y, jnp.where(mask, X / (1 - rate), 0.0), rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(Dropout(rate)(x, rngs=key) ** 2))(X)
    np.testing.assert_allclose(g, jnp.where(mask, 2 * X / (1 - rate) ** 2, 0.0), rtol=1e-5)


def test_statistics():
    x = jnp.ones((200, 200))
    y = Dropout(0.3)(x, rngs=jax.random.key(0))
    kept = np.asarray(y != 0)
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.7, rtol=1e-6)


def test_deterministic_is_identity():
    assert Dropout(0.5, deterministic=True)(X) is X
    assert Dropout(0.5)(X, deterministic=True) is X
    assert Dropout(0.0)(X) is X  # nothing to drop: no rngs needed
    d = Dropout(0.5, rngs=Rngs(0))

    class Model(nnx.Module):
        def __init__(self):
            self.dropout = d

    model = Model()
    model.eval()
    assert d.deterministic is True and d(X) is X
    model.train()
    assert d.deterministic is False and not np.array_equal(d(X), X)
    d.set_view(deterministic=True)
    assert d.deterministic is True
    d.set_view()
    assert d.deterministic is True


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1])
def test_rate_outside_unit_interval_is_rejected(rate):
    # the reference accepts 1.0 (dropping everything); refax asks for a rate in [0, 1)
    with pytest.raises(ValueError, match=r"Dropout: rate must be in \[0, 1\)"):
        Dropout(rate)


def test_dtype_is_preserved():
    x = X.astype(jnp.bfloat16)
    ref, mine = F.Dropout(0.5)(x, rngs=jax.random.key(0)), Dropout(0.5)(x, rngs=jax.random.key(0))
    assert mine.dtype == ref.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ref, np.float32), np.asarray(mine, np.float32))


def test_under_jit_with_split_merge():
    d = Dropout(0.5, rngs=Rngs(dropout=0))
    graphdef, state = nnx.split(d)

    @jax.jit
    def step(state, x):
        layer = nnx.merge(graphdef, state)
        y = layer(x)
        return y, nnx.state(layer)

    y1, state = step(state, X)
    y2, state = step(state, X)
    ref = F.Dropout(0.5, rngs=F.Rngs(dropout=0))
    np.testing.assert_array_equal(y1, ref(X))
    np.testing.assert_array_equal(y2, ref(X))


# -- errors ---------------------------------------------------------------------------------------
def test_missing_rngs():
    with pytest.raises(ValueError, match="Dropout needs random keys.*no `rngs`"):
        Dropout(0.5)(X)


def test_missing_deterministic():
    with pytest.raises(ValueError, match="No `deterministic` argument was provided to Dropout"):
        Dropout(0.5, deterministic=None)(X, rngs=Rngs(0))


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_bad_rate_message_names_the_value(rate):
    with pytest.raises(ValueError, match=rf"Dropout: rate must be in \[0, 1\), got {rate}"):
        Dropout(rate)


def test_bad_rngs_types():
    with pytest.raises(TypeError, match="Dropout: rngs must be an Rngs, an RngStream or None"):
        Dropout(0.5, rngs=jax.random.key(0))
    with pytest.raises(TypeError, match="Dropout: rngs must be an Rngs, an RngStream or a jax"):
        Dropout(0.5)(X, rngs=3)
