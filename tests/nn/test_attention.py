"""Tests of refax.nn.attention: differential against the reference NNX and hand-written jnp."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refax
from refax._rngs import Rngs
from refax._variables import Cache, Intermediate, Param
from refax.nn.attention import (
    MultiHeadAttention,
    combine_masks,
    dot_product_attention,
    dot_product_attention_weights,
    make_attention_mask,
    make_causal_mask,
)

nnx = pytest.importorskip("flax.nnx")
oracle_attention = pytest.importorskip("flax.nnx.nn.attention")

RTOL, ATOL = 1e-5, 1e-6


def _normal(seed, shape):
    # numpy data: no per-shape compilation of jax.random kernels.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _np(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def _ours_flat(model, *filters):
    return {p: _np(v[...]) for p, v in refax.to_flat_state(refax.state(model, *filters))}


def _oracle_flat(model, *filters):
    return {p: _np(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, *filters))}


def _assert_same_params(ours, oracle):
    a, b = _ours_flat(ours, Param), _oracle_flat(oracle, nnx.Param)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_allclose(a[path], b[path], rtol=RTOL, atol=ATOL, err_msg=str(path))


def _pair(*args, seed=0, **kwargs):
    kwargs.setdefault("decode", False)
    ours = MultiHeadAttention(*args, rngs=Rngs(seed), **kwargs)
    oracle = nnx.MultiHeadAttention(*args, rngs=nnx.Rngs(seed), **kwargs)
    return ours, oracle


def _ref_attention(q, k, v, mask=None, bias=None):
    """softmax(q k^T / sqrt(d) + bias) v with key/value heads repeated for grouped queries."""
    groups = q.shape[-2] // k.shape[-2]
    k, v = jnp.repeat(k, groups, axis=-2), jnp.repeat(v, groups, axis=-2)
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    return jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(logits, axis=-1), v)


# -- MultiHeadAttention vs the reference ------------------------------------------------------
# Shapes are shared across tests ((batch, length, features) = (2, 3, 4), 2 heads of size 2) so
# eager ops compile once.
CONFIGS = {
    "default": (dict(), 3, 4),
    "qkv_out_features": (dict(qkv_features=8, out_features=3), 3, 4),
    "cross_in_kv_features": (dict(in_kv_features=5), 5, 5),
    "normalize_qk": (dict(normalize_qk=True), 3, 4),
    "grouped_query": (dict(num_kv_heads=1), 3, 4),
    "no_bias": (dict(use_bias=False, out_kernel_init=jax.nn.initializers.normal(0.1)), 3, 4),
}


def _run_both(ours, oracle, fn):
    """``fn(model)`` for both models inside one jax.jit (one compile instead of eager ops)."""
    ours_def, ours_state = refax.split(ours)
    oracle_def, oracle_state = nnx.split(oracle)

    @jax.jit
    def run(ours_state, oracle_state):
        return fn(refax.merge(ours_def, ours_state)), fn(nnx.merge(oracle_def, oracle_state))

    return run(ours_state, oracle_state)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_params_and_outputs_match_reference(name):
    kwargs, kv_len, in_kv = CONFIGS[name]
    ours, oracle = _pair(2, 4, **kwargs)
    _assert_same_params(ours, oracle)
    assert ours.head_dim == oracle.head_dim and ours.num_kv_heads == oracle.num_kv_heads
    xq, xk, xv = (
        _normal(1, (2, 3, 4)),
        _normal(2, (2, kv_len, in_kv)),
        _normal(3, (2, kv_len, in_kv)),
    )
    self_attention = in_kv == 4

    def forward(model):
        return model(xq) if self_attention else xq, model(xq, xk, xv)

    for a, b in zip(*_run_both(ours, oracle, forward)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def test_structure_matches_reference():
    ours, oracle = _pair(2, 4, dropout_rate=0.1, normalize_qk=True)
    ours.init_cache((1, 6, 4))
    oracle.init_cache((1, 6, 4))
    assert _ours_flat(ours).keys() == _oracle_flat(oracle).keys()
    assert set(_ours_flat(ours, Cache)) == {("cached_key",), ("cached_value",), ("cache_index",)}
    assert ours.query.kernel.shape == (4, 2, 2) and ours.out.kernel.shape == (2, 2, 4)
    plain, _ = _pair(2, 4)
    assert plain.rngs is None and plain.query_ln is None and plain.cached_key is None


def test_self_attention_defaults():
    layer = MultiHeadAttention(2, 4, decode=False, rngs=Rngs(0))
    q, k = _normal(1, (2, 3, 4)), _normal(2, (2, 3, 4))
    np.testing.assert_array_equal(layer(q), layer(q, q, q))
    np.testing.assert_array_equal(layer(q, k), layer(q, k, k))


def test_masks_match_reference():
    ours, oracle = _pair(2, 4)
    x = _normal(1, (2, 3, 4))
    tokens = jnp.array([[3, 1, 0], [2, 7, 1]])
    mask = combine_masks(make_causal_mask(tokens), make_attention_mask(tokens > 0, tokens > 0))
    np.testing.assert_allclose(ours(x, mask=mask), oracle(x, mask=mask), rtol=RTOL, atol=ATOL)
    causal = ours(x, mask=make_causal_mask(tokens))
    np.testing.assert_allclose(ours(x, is_causal=True), causal, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        oracle(x, is_causal=True), ours(x, is_causal=True), rtol=RTOL, atol=ATOL
    )


def test_dtype_and_batch_dims():
    ours, oracle = _pair(2, 4, dtype=jnp.bfloat16)
    x = _normal(1, (2, 2, 3, 4))  # two batch dims
    y, expected = _run_both(ours, oracle, lambda model: model(x))
    assert y.shape == (2, 2, 3, 4) and y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(expected, np.float32), 0.02)


# -- dropout ------------------------------------------------------------------------------------
@pytest.mark.parametrize("broadcast_dropout", [True, False])
def test_dropout_matches_reference_with_same_rngs(broadcast_dropout):
    ours, oracle = _pair(2, 4, dropout_rate=0.5, broadcast_dropout=broadcast_dropout)
    x = _normal(1, (2, 3, 4))
    for _ in range(2):  # the kept streams advance identically
        y = ours(x, deterministic=False)
        np.testing.assert_allclose(y, oracle(x, deterministic=False), rtol=RTOL, atol=ATOL)
    call_time = ours(x, deterministic=False, rngs=Rngs(dropout=7))
    expected = oracle(x, deterministic=False, rngs=nnx.Rngs(dropout=7))
    np.testing.assert_allclose(call_time, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        ours(x, deterministic=True), oracle(x, deterministic=True), rtol=RTOL, atol=ATOL
    )


def test_dropout_train_eval_and_keys():
    layer = MultiHeadAttention(2, 4, dropout_rate=0.5, decode=False, rngs=Rngs(0))
    x = _normal(1, (2, 3, 4))
    with pytest.raises(ValueError, match="deterministic"):
        layer(x)
    layer.eval()
    assert layer.deterministic is True
    np.testing.assert_array_equal(layer(x), layer(x))
    layer.train()
    assert layer.deterministic is False
    assert not np.allclose(layer(x), layer(x))  # fresh keys each call
    key = jax.random.key(3)
    np.testing.assert_array_equal(layer(x, rngs=key), layer(x, rngs=key))
    no_rngs = MultiHeadAttention(
        2, 4, dropout_rate=0.5, deterministic=False, keep_rngs=False, decode=False, rngs=Rngs(0)
    )
    assert no_rngs.rngs is None
    with pytest.raises(ValueError, match="rngs"):
        no_rngs(x)
    assert no_rngs(x, rngs=Rngs(dropout=1)).shape == (2, 3, 4)


# -- sowing -------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning")
def test_sow_weights_matches_reference():
    ours, oracle = _pair(2, 4)
    x = _normal(1, (2, 3, 4))
    ours(x, sow_weights=True)
    oracle(x, sow_weights=True)
    ours(x)  # not sown
    (w,) = ours.attention_weights.get_value()
    assert isinstance(ours.attention_weights, Intermediate) and w.shape == (2, 2, 3, 3)
    np.testing.assert_allclose(w, oracle.attention_weights.get_value()[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=RTOL)


# -- decoding -----------------------------------------------------------------------------------
def test_decode_matches_causal_forward_and_reference():
    ours, oracle = _pair(2, 4)
    x = _normal(1, (2, 3, 4))
    full = ours(x, mask=make_causal_mask(jnp.ones((2, 3))))
    ours.init_cache(x.shape)
    oracle.init_cache(x.shape)
    steps = []
    for t in range(3):
        y = ours(x[:, t : t + 1], decode=True)
        np.testing.assert_allclose(y, oracle(x[:, t : t + 1], decode=True), rtol=RTOL, atol=ATOL)
        steps.append(y)
    # Different reduction orders than the full pass: a slightly looser tolerance.
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5)
    assert int(ours.cache_index[...]) == 3
    np.testing.assert_allclose(ours.cached_key[...], oracle.cached_key[...], rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="cache is full"):
        ours(x[:, :1], decode=True)


def test_grouped_query_decode_under_jit():
    layer = MultiHeadAttention(2, 4, num_kv_heads=1, normalize_qk=True, rngs=Rngs(0))
    x = _normal(1, (2, 3, 4))
    graphdef, state = refax.split(layer)

    @jax.jit
    def full(state, x):
        return refax.merge(graphdef, state)(x, mask=make_causal_mask(x[..., 0]), decode=False)

    layer.init_cache(x.shape)
    graphdef, state = refax.split(layer)

    @jax.jit
    def step(state, token):
        model = refax.merge(graphdef, state)
        return model(token, decode=True), refax.state(model)

    outs = []
    for t in range(3):
        y, state = step(state, x[:, t : t + 1])
        outs.append(y)
    expected = full(refax.state(layer), x)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), expected, rtol=1e-4, atol=1e-5)
    assert int(state["cache_index"][...]) == 3 and state["cached_key"].shape == (2, 3, 1, 2)


def test_set_view_initializes_cache():
    layer = MultiHeadAttention(2, 4, rngs=Rngs(0))
    layer.set_view(deterministic=True, decode=True, batch_size=2, max_length=3)
    assert layer.decode and layer.deterministic and layer.cached_value.shape == (2, 3, 2, 2)
    assert layer(jnp.ones((2, 1, 4))).shape == (2, 1, 4)


# -- errors -------------------------------------------------------------------------------------
def test_constructor_errors():
    with pytest.raises(ValueError, match=r"qkv_features \(6\) must be divisible by num_heads"):
        MultiHeadAttention(4, 6, rngs=Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiHeadAttention(4, 8, num_kv_heads=3, rngs=Rngs(0))


def test_call_errors():
    layer = MultiHeadAttention(2, 4, in_kv_features=3, rngs=Rngs(0))
    q, kv = jnp.ones((1, 2, 4)), jnp.ones((1, 2, 3))
    with pytest.raises(ValueError, match="decode"):
        layer(q, kv)
    with pytest.raises(ValueError, match=r"inputs_q .*in_features=4"):
        layer(jnp.ones((1, 2, 5)), kv, decode=False)
    with pytest.raises(ValueError, match=r"inputs_k .*in_kv_features=3"):
        layer(q, decode=False)
    with pytest.raises(ValueError, match="`inputs_k` cannot be None"):
        layer(q, None, kv, decode=False)
    with pytest.raises(ValueError, match="MultiHeadAttention: autoregressive cache not init"):
        layer(q[:, :1], kv[:, :1], decode=True)
    layer.init_cache((1, 4, 3))
    with pytest.raises(ValueError, match="one token per call"):
        layer(q, kv, decode=True)


def test_function_errors():
    q = jnp.ones((1, 3, 4, 8))
    with pytest.raises(ValueError, match="depths must match"):
        dot_product_attention(q, jnp.ones((1, 3, 4, 6)), jnp.ones((1, 3, 4, 6)))
    with pytest.raises(ValueError, match="lengths must match"):
        dot_product_attention(q, q, jnp.ones((1, 5, 4, 8)))
    with pytest.raises(ValueError, match="same rank"):
        dot_product_attention(q, q[0], q[0])
    with pytest.raises(ValueError, match="multiple"):
        dot_product_attention_weights(q, jnp.ones((1, 3, 3, 8)))
    with pytest.raises(ValueError, match="dropout_rng"):
        dot_product_attention(q, q, q, dropout_rate=0.1)
    with pytest.raises(ValueError, match="same rank"):
        combine_masks(jnp.ones((2, 2)), jnp.ones((1, 2, 2)))


# -- functions (run under jax.jit: one compile instead of many eager ones) -------------------
def _qkv(shape, kv_heads=None, seed=0):
    kv_shape = shape if kv_heads is None else shape[:-2] + (kv_heads, shape[-1])
    return _normal(seed, shape), _normal(seed + 1, kv_shape), _normal(seed + 2, kv_shape)


@pytest.mark.parametrize(
    "shape,kv_heads",
    [((2, 3, 2, 2), None), ((3, 2, 2), None), ((2, 2, 3, 2, 2), None), ((2, 3, 4, 2), 2)],
    ids=["batch", "no_batch", "two_batch_dims", "grouped_query"],
)
def test_dot_product_attention_vs_jnp(shape, kv_heads):
    q, k, v = _qkv(shape, kv_heads)
    heads, length = shape[-2], shape[-3]
    mask = np.random.default_rng(5).random(shape[:-3] + (1, length, length)) < 0.7
    bias = _normal(6, (heads, length, length))

    @jax.jit
    def run(q, k, v, bias, mask):
        return (
            _ref_attention(q, k, v, mask, bias),
            dot_product_attention(q, k, v, bias, mask),  # jax.nn.dot_product_attention path
            dot_product_attention(q, k, v, bias, mask, precision="highest"),  # weights path
            oracle_attention.dot_product_attention(q, k, v, bias, mask, precision="highest"),
        )

    expected, *got = run(q, k, v, bias, mask)
    for out in got:
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_dot_product_attention_grad_vs_jnp():
    q, k, v = _qkv((2, 3, 2, 2))
    mask = make_causal_mask(jnp.ones((2, 3)))

    @jax.jit
    def grads(q, k, v):
        def grad(fn, **kw):
            loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask=mask, **kw)))
            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

        fns = (_ref_attention, dot_product_attention, dot_product_attention)
        return [grad(fn, **kw) for fn, kw in zip(fns, (dict(), dict(), dict(precision="highest")))]

    expected, *got = grads(q, k, v)
    for g in got:
        for a, b in zip(g, expected):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dot_product_attention_value_depth_causal_and_dtype():
    q, k, _ = _qkv((2, 3, 2, 2))
    v = _normal(9, (2, 3, 2, 5))  # value depth differs from query/key depth

    @jax.jit
    def run(q, k, v):
        causal = make_causal_mask(jnp.ones((2, 3)))
        return (
            dot_product_attention(q, k, v, is_causal=True),
            _ref_attention(q, k, v, causal),
            dot_product_attention(q, k, v, dtype=jnp.bfloat16),
            _ref_attention(q, k, v),
        )

    got, expected, half, full = run(q, k, v)
    assert got.shape == (2, 3, 2, 5) and half.dtype == jnp.bfloat16
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(half, np.float32), full, 0.05, 0.05)


def test_weights_dropout_matches_reference():
    q, k, v = _qkv((2, 3, 2, 2), kv_heads=1)
    causal = make_causal_mask(jnp.ones((2, 3)))

    @jax.jit
    def run(q, k, v, rng):
        outs = []
        for broadcast_dropout in (True, False):
            kw = dict(dropout_rate=0.3, broadcast_dropout=broadcast_dropout, is_causal=True)
            for ours, oracle in (
                (dot_product_attention_weights, oracle_attention.dot_product_attention_weights),
                (dot_product_attention, oracle_attention.dot_product_attention),
            ):
                args = (q, k) if ours is dot_product_attention_weights else (q, k, v)
                outs.append(
                    (ours(*args, dropout_rng=rng, **kw), oracle(*args, dropout_rng=rng, **kw))
                )
        det = dot_product_attention(q, k, v, dropout_rate=0.3, deterministic=True, mask=causal)
        return outs, det, _ref_attention(q, k, v, causal)

    outs, det, expected = run(q, k, v, jax.random.key(4))
    for ours, oracle in outs:
        np.testing.assert_allclose(ours, oracle, rtol=RTOL, atol=ATOL)
    kept_broadcast, kept = np.asarray(outs[0][0] != 0), np.asarray(outs[2][0] != 0)
    assert not kept.all() and (kept_broadcast == kept_broadcast[:1, :1]).all()
    assert not (kept == kept[:1, :1]).all()  # independent masks per batch entry and head
    np.testing.assert_allclose(det, expected, rtol=RTOL, atol=ATOL)


def test_weights_sown_into_module():
    q, k, v = _qkv((2, 3, 2, 2))
    holder = refax.Module()
    dot_product_attention(q, k, v, module=holder)
    (w,) = holder.attention_weights.get_value()
    expected = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(2.0))
    np.testing.assert_allclose(w, expected, rtol=RTOL, atol=ATOL)


# -- masks --------------------------------------------------------------------------------------
def test_make_attention_mask_vs_numpy():
    qi = np.array([[1, 1, 0], [1, 0, 0]])
    ki = np.array([[1, 0, 1, 1], [1, 1, 1, 0]])
    mask = make_attention_mask(qi, ki)
    assert mask.shape == (2, 1, 3, 4) and mask.dtype == jnp.float32
    np.testing.assert_array_equal(mask[:, 0], qi[:, :, None] * ki[:, None, :])
    ge = make_attention_mask(qi, ki, jnp.greater_equal, extra_batch_dims=2, dtype=jnp.bool_)
    assert ge.shape == (1, 1, 2, 1, 3, 4) and ge.dtype == jnp.bool_
    np.testing.assert_array_equal(ge[0, 0, :, 0], qi[:, :, None] >= ki[:, None, :])
    np.testing.assert_array_equal(
        make_attention_mask(qi, ki),
        oracle_attention.make_attention_mask(jnp.asarray(qi), jnp.asarray(ki)),
    )


def test_make_causal_mask_vs_numpy():
    mask = make_causal_mask(jnp.zeros((2, 4)), extra_batch_dims=1, dtype=jnp.int32)
    assert mask.shape == (1, 2, 1, 4, 4) and mask.dtype == jnp.int32
    np.testing.assert_array_equal(mask[0, 1, 0], np.tril(np.ones((4, 4), np.int32)))
    np.testing.assert_array_equal(make_causal_mask(jnp.zeros(3)), np.tril(np.ones((1, 3, 3))))


def test_combine_masks():
    a = np.array([[1, 1, 0, 1]], bool)
    b = np.array([[1, 0, 1, 1], [0, 1, 1, 1]], bool)
    assert combine_masks(None, None) is None
    np.testing.assert_array_equal(combine_masks(a, None, b), (a & b).astype(np.float32))
    np.testing.assert_array_equal(combine_masks(a, dtype=jnp.bool_), a)
    np.testing.assert_array_equal(combine_masks(a, b), oracle_attention.combine_masks(a, b))
