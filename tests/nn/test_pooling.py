"""Tests for refax.nn.pooling: pool / avg_pool / max_pool / min_pool.

Checked against a direct NumPy implementation (explicit windows) and against flax.nnx.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from refax.nn.pooling import avg_pool, max_pool, min_pool, pool

OURS = {"avg": avg_pool, "max": max_pool, "min": min_pool}
REFS = {"avg": nnx.avg_pool, "max": nnx.max_pool, "min": nnx.min_pool}


def _inputs(shape, dtype=np.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _close(a, b, rtol=1e-5, atol=1e-6):
    a, b = jnp.asarray(a), jnp.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol
    )


def _same_pads(sizes, window, strides):
    pads = []
    for size, w, s in zip(sizes, window, strides):
        total = max((-(-size // s) - 1) * s + w - size, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def np_pool(x, reduce, init, window, strides, padding):
    """Reduces explicit windows of ``x`` (``(*batch, *spatial, features)``) with NumPy."""
    x = np.asarray(x, np.float64)
    n = len(window)
    nb = x.ndim - n - 1
    strides = strides or (1,) * n
    if padding == "VALID":
        pads = [(0, 0)] * n
    elif padding == "SAME":
        pads = _same_pads(x.shape[nb:-1], window, strides)
    else:
        pads = [tuple(p) for p in padding]
    xp = np.pad(x, [(0, 0)] * nb + pads + [(0, 0)], constant_values=init)
    out_sp = [(p - w) // s + 1 for p, w, s in zip(xp.shape[nb:-1], window, strides)]
    out = np.empty(x.shape[:nb] + tuple(out_sp) + x.shape[-1:])
    lead = (slice(None),) * nb
    for pos in itertools.product(*map(range, out_sp)):
        win = tuple(slice(p * s, p * s + w) for p, s, w in zip(pos, strides, window))
        out[lead + pos] = reduce(xp[lead + win], axis=tuple(range(nb, nb + n)))
    return out


def np_avg(x, window, strides, padding, count_include_pad):
    total = np_pool(x, np.sum, 0.0, window, strides, padding)
    if count_include_pad:
        return total / np.prod(window)
    count = np_pool(np.ones_like(np.asarray(x)), np.sum, 0.0, window, strides, padding)
    return total / count


_CASES = [
    # (input shape, window, strides, padding)
    ((2, 7, 3), (3,), None, "VALID"),
    ((2, 7, 3), (2,), (2,), "SAME"),
    ((7, 3), (3,), (2,), ((1, 2),)),  # unbatched
    ((2, 5, 6, 3), (2, 3), (1, 2), "SAME"),
    ((1, 5, 6, 2), (3, 3), (2, 2), ((1, 1), (0, 2))),
    ((5, 6, 2), (2, 2), None, "SAME"),  # unbatched 2-D
    ((1, 4, 3, 4, 2), (2, 2, 3), (2, 1, 1), "VALID"),
    ((2, 3, 5, 4, 2), (3, 2), (2, 2), "SAME"),  # two batch dims
]


@pytest.mark.parametrize("kind", ["avg", "max", "min"])
@pytest.mark.parametrize("shape,window,strides,padding", _CASES)
def test_pool_vs_numpy_and_oracle(kind, shape, window, strides, padding):
    x = _inputs(shape)
    y = OURS[kind](x, window, strides, padding)
    if kind == "avg":
        want = np_avg(x, window, strides, padding, count_include_pad=True)
    else:
        reduce, init = (np.max, -np.inf) if kind == "max" else (np.min, np.inf)
        want = np_pool(x, reduce, init, window, strides, padding)
    _close(y, want)
    assert y.dtype == jnp.float32
    _close(y, REFS[kind](x, window, strides, padding), rtol=0, atol=0)


@pytest.mark.parametrize("shape,window,strides,padding", _CASES)
def test_avg_pool_count_exclude_pad(shape, window, strides, padding):
    x = _inputs(shape)
    y = avg_pool(x, window, strides, padding, count_include_pad=False)
    _close(y, np_avg(x, window, strides, padding, count_include_pad=False))
    ref = nnx.avg_pool(x, window, strides, padding, count_include_pad=False)
    _close(y, ref)
    assert y.dtype == ref.dtype


def test_explicit_padding_with_several_batch_dims():
    # the reference only pads one batch dim here; refax pads every leading batch dim with (0, 0)
    x = _inputs((2, 3, 6, 2))
    y = max_pool(x, (3,), (2,), ((1, 1),))
    _close(y, np_pool(x, np.max, -np.inf, (3,), (2,), ((1, 1),)))
    _close(y[1], nnx.max_pool(x[1], (3,), (2,), ((1, 1),)))


def test_pool_custom_reduction():
    x = _inputs((1, 6, 2))
    y = pool(x, 1.0, lax.mul, (3,), (1,), "VALID")
    _close(y, np_pool(x, np.prod, 1.0, (3,), (1,), "VALID"))
    _close(y, nnx.pool(x, 1.0, lax.mul, (3,), (1,), "VALID"))


def test_padding_values_are_the_init_value():
    x = -jnp.ones((1, 3, 1))
    assert max_pool(x, (2,), padding="SAME")[0, -1, 0] == -1.0  # -inf padding never wins
    assert min_pool(-x, (2,), padding="SAME")[0, -1, 0] == 1.0
    _close(avg_pool(x, (2,), padding="SAME")[0, :, 0], [-1.0, -1.0, -0.5])


def test_int_padding_and_int_strides_are_broadcast():
    x = _inputs((1, 5, 4, 2))
    _close(max_pool(x, (2, 2), 2, 1), nnx.max_pool(x, (2, 2), (2, 2), ((1, 1), (1, 1))))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.int32])
@pytest.mark.parametrize("kind", ["avg", "max", "min"])
def test_dtypes_match_oracle(kind, dtype):
    x = (_inputs((1, 5, 2)) * 4).astype(dtype)
    for kwargs in ({}, {"count_include_pad": False}) if kind == "avg" else ({},):
        y = OURS[kind](x, (2,), padding="SAME", **kwargs)
        ref = REFS[kind](x, (2,), padding="SAME", **kwargs)
        assert y.dtype == ref.dtype
        _close(y, ref, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_grads_match_oracle(kind):
    x = _inputs((2, 5, 4, 3))

    def grad(fn):
        loss = lambda x: jnp.sum(jnp.sin(fn(x, (2, 3), (2, 1), "SAME")))
        return jax.jit(jax.grad(loss))(x)

    g = grad(OURS[kind])
    _close(g, grad(REFS[kind]))
    if kind == "max":  # each window sends its gradient to its arg-max only
        assert int(jnp.sum(g != 0)) <= 3 * 2 * 4 * 3


def test_avg_pool_is_linear_average():
    x = jnp.arange(8.0).reshape(1, 4, 2)
    _close(avg_pool(x, (2,), (2,))[0], [[1.0, 2.0], [5.0, 6.0]])


def test_works_under_jit_and_vmap():
    x = _inputs((3, 2, 6, 2))
    f = lambda x: max_pool(x, (2,), (2,))
    _close(jax.jit(jax.vmap(f))(x), max_pool(x, (2,), (2,)))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x: max_pool(x[0, 0], (2, 2)), ValueError, r"rank >= 3.*\(6, 2\)"),
        (lambda x: max_pool(x, (2,), strides=(1, 1)), ValueError, "one entry per spatial dim"),
        (lambda x: avg_pool(x, (2,), padding="FULL"), ValueError, "unknown padding"),
        (lambda x: min_pool(x, (2,), padding=((1, 1), (1, 1))), ValueError, "Invalid padding"),
        (lambda x: max_pool(x, 2), TypeError, "window_shape must be a sequence"),
    ],
)
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call(jnp.ones((1, 1, 6, 2)))
