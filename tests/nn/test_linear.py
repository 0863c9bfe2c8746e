"""Linear, LinearGeneral, Einsum and Embed: oracle parity, reference math, gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as F

from refax import nnx
from refax._rngs import Rngs
from refax.nn import Einsum, Embed, Linear, LinearGeneral, initializers
from tests.nn._compare import assert_same_attrs, assert_same_output, f32, grads

# (dtype, param_dtype): inferred, explicit up-cast and explicit down-cast computations.
DTYPE_PRODUCT = [
    (None, jnp.float32),
    (None, jnp.bfloat16),
    (jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32),
]


X = jax.random.normal(jax.random.key(42), (4, 3, 6))


# -- Linear ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PRODUCT)
@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_matches_oracle(dtype, param_dtype, use_bias):
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype)
    bias_init = initializers.normal(1.0)
    ref = F.Linear(6, 5, **kw, bias_init=bias_init, rngs=F.Rngs(0))
    mine = Linear(6, 5, **kw, bias_init=bias_init, rngs=Rngs(0))
    assert_same_attrs(ref, mine, ["kernel", "bias"])
    for x in (X, X.astype(jnp.bfloat16)):
        assert_same_output(ref(x), mine(x))


def test_linear_consumes_same_keys_as_oracle():
    for use_bias in (True, False):
        ref_rngs, rngs = F.Rngs(params=0), Rngs(params=0)
        F.Linear(2, 3, use_bias=use_bias, rngs=ref_rngs)
        Linear(2, 3, use_bias=use_bias, rngs=rngs)
        assert int(rngs.params.count[...]) == int(ref_rngs.params.count[...]) == 1 + use_bias


def test_linear_reference_math_and_grads():
    m = Linear(6, 5, bias_init=initializers.normal(1.0), rngs=Rngs(1))
    k, b = m.kernel[...], m.bias[...]
    np.testing.assert_allclose(m(X), X @ k + b, rtol=1e-5, atol=1e-6)

    def loss(m, x):
        return jnp.sum(jnp.sin(m(x)))

    g_state, g_x = grads(m, loss, X)
    ref_k, ref_b, ref_x = jax.grad(lambda k, b, x: jnp.sum(jnp.sin(x @ k + b)), (0, 1, 2))(k, b, X)
    np.testing.assert_allclose(g_state["kernel"][...], ref_k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_state["bias"][...], ref_b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_x, ref_x, rtol=1e-5, atol=1e-5)


def test_linear_signature_and_attributes():
    m = Linear(2, 3, rngs=Rngs(0))
    assert (m.in_features, m.out_features, m.use_bias, m.dtype) == (2, 3, True, None)
    assert m.param_dtype is jnp.float32 and m.precision is None
    assert m.kernel.shape == (2, 3) and m.bias.shape == (3,)
    assert isinstance(m.kernel, nnx.Param) and isinstance(m.bias, nnx.Param)
    # Initializers are not part of the structure: equal GraphDefs for different inits.
    other = Linear(2, 3, kernel_init=initializers.zeros, rngs=Rngs(0))
    assert nnx.graphdef(m) == nnx.graphdef(other)


def test_linear_metadata_and_preferred_element_type():
    m = Linear(
        2,
        3,
        kernel_metadata={"sharding_names": ("a", "b")},
        bias_metadata={"sharding_names": ("b",)},
        rngs=Rngs(0),
    )
    assert m.kernel.sharding_names == ("a", "b") and m.bias.sharding_names == ("b",)
    init = nnx.with_metadata(initializers.lecun_normal(), sharding_names=("x", None))
    assert Linear(2, 3, kernel_init=init, rngs=Rngs(0)).kernel.sharding_names == ("x", None)
    m = Linear(2, 3, param_dtype=jnp.bfloat16, preferred_element_type=jnp.float32, rngs=Rngs(0))
    ref = F.Linear(
        2, 3, param_dtype=jnp.bfloat16, preferred_element_type=jnp.float32, rngs=F.Rngs(0)
    )
    x = jnp.ones((1, 2), jnp.bfloat16)
    assert_same_output(ref(x), m(x))


def test_linear_under_jit():
    m = Linear(6, 5, rngs=Rngs(0))
    graphdef, state = nnx.split(m)
    y = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, X)
    np.testing.assert_allclose(y, m(X), rtol=1e-6)


@pytest.mark.parametrize("shape", [(4, 5), (6, 7), ()])
def test_linear_bad_input(shape):
    m = Linear(6, 5, rngs=Rngs(0))
    with pytest.raises(ValueError, match=r"Linear.*in_features=6.*" + re_shape(shape)):
        m(jnp.ones(shape))


def re_shape(shape):
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


# -- LinearGeneral --------------------------------------------------------------------------
LG_CASES = [
    dict(in_features=6, out_features=5),
    dict(in_features=(3, 6), out_features=(2, 5), axis=(-2, -1)),
    dict(in_features=(4, 6), out_features=5, axis=(0, 2)),
    dict(in_features=6, out_features=(2, 5), batch_axis={0: 4}),
    dict(in_features=6, out_features=2, batch_axis={0: 4, 1: 3}),
]


@pytest.mark.parametrize("case", range(len(LG_CASES)))
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PRODUCT)
def test_linear_general_matches_oracle(case, dtype, param_dtype):
    kw = dict(LG_CASES[case], dtype=dtype, param_dtype=param_dtype)
    kw["bias_init"] = initializers.normal(1.0)
    ref, mine = F.LinearGeneral(**kw, rngs=F.Rngs(3)), LinearGeneral(**kw, rngs=Rngs(3))
    assert_same_attrs(ref, mine, ["kernel", "bias"])
    assert (mine.in_features, mine.out_features, mine.axis) == (
        ref.in_features,
        ref.out_features,
        ref.axis,
    )
    assert_same_output(ref(X), mine(X))


def test_linear_general_reference_math_and_grads():
    m = LinearGeneral((3, 6), (2, 5), axis=(1, 2), bias_init=initializers.normal(), rngs=Rngs(0))
    k, b = m.kernel[...], m.bias[...]

    def ref(k, b, x):
        return jnp.einsum("bij,ijkl->bkl", x, k) + b

    np.testing.assert_allclose(m(X), ref(k, b, X), rtol=1e-5, atol=1e-5)
    g_state, g_x = grads(m, lambda m, x: jnp.sum(m(x) ** 2), X)
    ref_k, ref_b, ref_x = jax.grad(lambda k, b, x: jnp.sum(ref(k, b, x) ** 2), (0, 1, 2))(k, b, X)
    np.testing.assert_allclose(g_state["kernel"][...], ref_k, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_state["bias"][...], ref_b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_x, ref_x, rtol=1e-4, atol=1e-4)


def test_linear_general_errors():
    with pytest.raises(ValueError, match="same length"):
        LinearGeneral((2, 3), 4, axis=-1, rngs=Rngs(0))
    with pytest.raises(ValueError, match="consecutive leading"):
        LinearGeneral(3, 4, batch_axis={1: 2}, rngs=Rngs(0))
    m = LinearGeneral((3, 6), 2, axis=(-2, -1), rngs=Rngs(0))
    with pytest.raises(ValueError, match=r"LinearGeneral.*\(3, 6\).*\(4, 6, 3\)"):
        m(jnp.ones((4, 6, 3)))
    with pytest.raises(ValueError, match="LinearGeneral: axis -2 is out of range"):
        m(jnp.ones((6,)))


# -- Einsum -----------------------------------------------------------------------------------
EINSUM_CASES = [
    ("btd,dnh->btnh", (6, 2, 5), (2, 5)),
    ("btd,bd->bt", (4, 6), (4,)),
    ("btd,dh->bth", (6, 3), None),
    ("...d,dh->...h", (6, 3), (3,)),
    ("btd,dh->bth", (6, 3), 3),  # an int bias_shape is a 1-D bias
    ("b...d,dh...->bh...", (6, 5, 3), (5, 3)),  # kernel dims matched by '...' get a bias
    ("...d,dh...->...h", (6, 5, 3), (3, 5)),  # '...' dims broadcast right-aligned
]


@pytest.mark.parametrize("case", range(len(EINSUM_CASES)))
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PRODUCT)
def test_einsum_matches_oracle(case, dtype, param_dtype):
    eq, kshape, bshape = EINSUM_CASES[case]
    kw = dict(dtype=dtype, param_dtype=param_dtype, bias_init=initializers.normal(1.0))
    ref, mine = (
        F.Einsum(eq, kshape, bshape, **kw, rngs=F.Rngs(0)),
        Einsum(eq, kshape, bshape, **kw, rngs=Rngs(0)),
    )
    assert_same_attrs(ref, mine, ["kernel", "bias"])
    assert_same_output(ref(X), mine(X))


def test_einsum_reference_math_call_override_and_grads():
    m = Einsum("btd,dnh->btnh", (6, 2, 5), (2, 5), bias_init=initializers.normal(), rngs=Rngs(0))
    k, b = m.kernel[...], m.bias[...]
    np.testing.assert_allclose(m(X), jnp.einsum("btd,dnh->btnh", X, k) + b, rtol=1e-5, atol=1e-5)
    y = m(X, einsum_str="b t d, d n h -> b n t h")
    np.testing.assert_allclose(y, jnp.einsum("btd,dnh->bnth", X, k) + b[:, None], rtol=1e-5)
    g_state, _ = grads(m, lambda m, x: jnp.sum(m(x) ** 2), X)
    ref_k = jax.grad(lambda k: jnp.sum((jnp.einsum("btd,dnh->btnh", X, k) + b) ** 2))(k)
    np.testing.assert_allclose(g_state["kernel"][...], ref_k, rtol=1e-4, atol=1e-4)


def test_einsum_int_bias_shape_is_one_dim():
    m = Einsum("ik,kj->ij", (5, 4), 4, rngs=Rngs(0))
    assert m.bias_shape == (4,) and m.bias.shape == (4,)
    assert nnx.graphdef(m) == nnx.graphdef(Einsum("ik,kj->ij", (5, 4), 4, rngs=Rngs(1)))
    with pytest.raises(ValueError, match=r"Einsum: bias_shape .* got 0\."):
        Einsum("ik,kj->ij", (5, 4), 0, rngs=Rngs(0))


def test_einsum_errors():
    with pytest.raises(ValueError, match='include "->"'):
        Einsum("ab,bc", (3, 4), rngs=Rngs(0))
    m = Einsum("ab,bc->ac", (3, 4), rngs=Rngs(0))
    with pytest.raises(ValueError, match="exactly one comma"):
        m(jnp.ones((2, 3)), einsum_str="ab,bc,cd->ad")
    with pytest.raises(ValueError, match=r"Einsum.*rank 2.*\(2, 3, 3\)"):
        m(jnp.ones((2, 3, 3)))
    with pytest.raises(ValueError, match=r"Einsum: label 'b'.*size 3.*but 5"):
        m(jnp.ones((2, 5)))


# -- Embed ------------------------------------------------------------------------------------
IDS = jnp.array([[0, 3, 4], [1, 2, 2]])


@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PRODUCT + [(jnp.float16, jnp.float32)])
def test_embed_matches_oracle(dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    ref, mine = F.Embed(5, 6, **kw, rngs=F.Rngs(0)), Embed(5, 6, **kw, rngs=Rngs(0))
    assert_same_attrs(ref, mine, ["embedding"])
    assert mine.dtype == ref.dtype
    assert_same_output(ref(IDS), mine(IDS))
    for q in (X, X.astype(jnp.bfloat16)):
        assert_same_output(ref.attend(q), mine.attend(q))
    out_of_range = jnp.array([7, -1])
    np.testing.assert_array_equal(f32(ref(out_of_range)), f32(mine(out_of_range)))


def test_embed_reference_math_and_grads():
    m = Embed(5, 6, rngs=Rngs(0))
    table = m.embedding[...]
    np.testing.assert_array_equal(m(IDS), table[IDS])
    np.testing.assert_allclose(m.attend(X), X @ table.T, rtol=1e-5, atol=1e-5)
    g_state, g_q = grads(m, lambda m, q: jnp.sum(m.attend(q) ** 2) + jnp.sum(m(IDS)), X)
    ref_t, ref_q = jax.grad(lambda t, q: jnp.sum((q @ t.T) ** 2) + jnp.sum(t[IDS]), argnums=(0, 1))(
        table, X
    )
    np.testing.assert_allclose(g_state["embedding"][...], ref_t, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_q, ref_q, rtol=1e-4, atol=1e-4)


def test_embed_single_row_and_metadata():
    m = Embed(1, 3, embedding_metadata={"sharding_names": (None, "model")}, rngs=Rngs(0))
    ref = F.Embed(1, 3, rngs=F.Rngs(0))
    assert m.embedding.sharding_names == (None, "model")
    assert_same_output(ref(jnp.array([[0, 5]])), m(jnp.array([[0, 5]])))


def test_embed_errors():
    m = Embed(5, 6, rngs=Rngs(0))
    with pytest.raises(ValueError, match="Embed: input type must be an integer.*float32"):
        m(jnp.ones((2,)))
    with pytest.raises(ValueError, match=r"Embed.attend.*features=6.*\(2, 4\)"):
        m.attend(jnp.ones((2, 4)))
