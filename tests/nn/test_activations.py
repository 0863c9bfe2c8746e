"""Activations, PReLU, initializers and dtype helpers against the oracle and plain JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as F
from flax.nnx.nn import dtypes as F_dtypes

from refax import nn
from refax import nnx as refax_nnx
from refax._rngs import Rngs
from refax.nn import PReLU, activations, dtypes, initializers

ACTIVATIONS = (
    "celu elu gelu glu hard_sigmoid hard_silu hard_swish hard_tanh leaky_relu log_sigmoid "
    "log_softmax logsumexp one_hot relu relu6 selu sigmoid identity silu soft_sign softmax "
    "softplus standardize swish tanh"
).split()
INITIALIZERS = (
    "constant delta_orthogonal glorot_normal glorot_uniform he_normal he_uniform kaiming_normal "
    "kaiming_uniform lecun_normal lecun_uniform normal ones orthogonal truncated_normal uniform "
    "variance_scaling xavier_normal xavier_uniform zeros zeros_init ones_init"
).split()
X = jax.random.normal(jax.random.key(0), (3, 4)) * 3.0


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_matches_oracle(name):
    fn = getattr(nn, name)
    assert fn is getattr(activations, name)
    assert name in activations.__all__
    ref = getattr(F, name)
    if name == "one_hot":
        ids = jnp.array([0, 2, 1])
        np.testing.assert_array_equal(fn(ids, 3), ref(ids, 3))
    else:
        np.testing.assert_allclose(fn(X), ref(X), rtol=1e-6, atol=1e-7)


def test_activations_are_jax_functions():
    assert nn.tanh is jnp.tanh
    for name in ACTIVATIONS:
        if name != "tanh":
            assert getattr(nn, name) is getattr(jax.nn, name), name


def test_gelu_uses_tanh_approximation_by_default():
    x = jnp.linspace(-3, 3, 7)
    approx = 0.5 * x * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(nn.gelu(x), approx, rtol=1e-6, atol=1e-6)


# -- PReLU ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [None, jnp.float32, jnp.float16])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
def test_prelu_matches_oracle(dtype, param_dtype, x_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    ref, mine = F.PReLU(0.2, **kw), PReLU(0.2, **kw)
    assert mine.negative_slope.dtype == ref.negative_slope.dtype
    np.testing.assert_allclose(np.float32(mine.negative_slope[...]), ref.negative_slope[...])
    x = X.astype(x_dtype)
    ya, yb = ref(x), mine(x)
    assert ya.dtype == yb.dtype
    np.testing.assert_array_equal(np.asarray(ya, np.float32), np.asarray(yb, np.float32))


def test_prelu_reference_math_grads_and_metadata():
    layer = PReLU(0.3, negative_slope_metadata={"sharding_names": ()})
    assert isinstance(layer.negative_slope, refax_nnx.Param)
    assert layer.negative_slope.sharding_names == ()
    np.testing.assert_allclose(layer(X), jnp.where(X >= 0, X, 0.3 * X), rtol=1e-6)
    graphdef, state = refax_nnx.split(layer)
    g = jax.grad(lambda s: jnp.sum(refax_nnx.merge(graphdef, s)(X)))(state)
    np.testing.assert_allclose(g["negative_slope"][...], jnp.sum(jnp.where(X >= 0, 0.0, X)))


# -- initializers ---------------------------------------------------------------------------------
def test_initializers_namespace():
    for name in INITIALIZERS:
        assert hasattr(initializers, name), name
        assert name in initializers.__all__
    assert nn.initializers is initializers
    assert initializers.zeros_init() is jax.nn.initializers.zeros
    assert initializers.ones_init() is jax.nn.initializers.ones


@pytest.mark.parametrize(
    "factory,args",
    [
        ("lecun_normal", ()),
        ("glorot_uniform", ()),
        ("he_normal", ()),
        ("variance_scaling", (2.0, "fan_avg", "uniform")),
        ("normal", (0.5,)),
        ("uniform", (2.0,)),
        ("truncated_normal", (0.1,)),
        ("orthogonal", ()),
        ("constant", (0.7,)),
    ],
)
def test_initializer_values_match_oracle(factory, args):
    key = jax.random.key(4)
    mine = getattr(initializers, factory)(*args)(key, (5, 3), jnp.float32)
    ref = getattr(F.initializers, factory)(*args)(key, (5, 3), jnp.float32)
    np.testing.assert_array_equal(mine, ref)


# -- dtypes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,kw",
    [
        ((jnp.ones(2, jnp.bfloat16), None, jnp.ones(2, jnp.int32)), {}),
        ((jnp.ones(2, jnp.int32),), {"inexact": False}),
        ((jnp.ones(2, jnp.int8), 3.0), {}),
        ((1, 2), {}),
        ((jnp.ones(2), jnp.ones(1, jnp.float16)), {"dtype": jnp.float16}),
        ((jnp.ones(2, jnp.bfloat16), jnp.ones(2)), {}),
    ],
)
def test_dtype_helpers_match_oracle(args, kw):
    assert dtypes.canonicalize_dtype(*args, **kw) == F_dtypes.canonicalize_dtype(*args, **kw)
    mine, ref = dtypes.promote_dtype(args, **kw), F_dtypes.promote_dtype(args, **kw)
    assert type(mine) is tuple and len(mine) == len(ref)
    for a, b in zip(mine, ref):
        if b is None:
            assert a is None
        else:
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_promote_dtype_accepts_variables():
    p = refax_nnx.Param(jnp.ones(2, jnp.bfloat16))
    (out, other) = dtypes.promote_dtype((p, jnp.ones(2)))
    assert isinstance(out, jax.Array) and out.dtype == other.dtype == jnp.float32


def test_promote_dtype_rejects_integer_target():
    with pytest.raises(ValueError, match="Dtype must be inexact"):
        dtypes.promote_dtype((jnp.ones(2, jnp.int32),), dtype=jnp.int32)


def test_layers_accept_custom_promote_dtype():
    seen = []

    def spy(args, *, dtype=None, inexact=True):
        seen.append(len(args))
        return dtypes.promote_dtype(args, dtype=dtype, inexact=inexact)

    nn.Linear(3, 2, promote_dtype=spy, rngs=Rngs(0))(jnp.ones((1, 3)))
    nn.LayerNorm(3, promote_dtype=spy, rngs=Rngs(0))(jnp.ones((1, 3)))
    nn.BatchNorm(3, promote_dtype=spy, rngs=Rngs(0))(jnp.ones((2, 3)))
    nn.Embed(4, 3, promote_dtype=spy, rngs=Rngs(0))(jnp.array([1]))
    assert seen == [3, 3, 5, 1]
