"""Tests for refax.nn.conv: Conv, ConvTranspose, canonicalize_padding.

Differential against flax.nnx (same seed -> same params and outputs), plus an independent
NumPy reference (explicit sums / scatter), gradients and bad-input errors.
"""

from __future__ import annotations

import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from refax._rngs import Rngs
from refax.nn.conv import Conv, ConvTranspose, canonicalize_padding

RTOL = 1e-5


def _close(a, b, rtol=RTOL, atol=1e-6):
    a, b = jnp.asarray(a), jnp.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol, atol=atol
    )


def key_init(key, shape, dtype=jnp.float32):
    """A compile-free initializer that still depends on the key (so draw order is checked)."""
    seed = int(np.asarray(jax.random.key_data(key), np.uint64).sum())
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 0.5, dtype)


FAST = dict(kernel_init=key_init, bias_init=key_init)


def _pair(name, *args, seed=0, default_init=False, **kwargs):
    """The refax layer and the oracle layer built with the same arguments and seed.

    Unless ``default_init``, the kernel and bias come from :func:`key_init`: the default
    (truncated normal) initializer costs one XLA compile per kernel shape.
    """
    if not default_init:
        kwargs = FAST | kwargs
    ours = {"Conv": Conv, "ConvTranspose": ConvTranspose}[name](*args, rngs=Rngs(seed), **kwargs)
    ref = getattr(nnx, name)(*args, rngs=nnx.Rngs(seed), **kwargs)
    _close(ours.kernel[...], ref.kernel[...], rtol=0, atol=0)
    assert ours.kernel_shape == ref.kernel_shape
    if ref.bias is None:
        assert ours.bias is None
    else:
        _close(ours.bias[...], ref.bias[...], rtol=0, atol=0)
    return ours, ref


def _inputs(shape, dtype=jnp.float32, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# oracle differential
@pytest.mark.parametrize(
    "name,args,kwargs,x_shape",
    [
        # one XLA compile of the truncated-normal initializer per kernel shape: keep this short
        # (the (3, 3, 4) kernels share their compile with the doctests of refax.nn.conv)
        ("Conv", (6, 4, 3), dict(feature_group_count=2, strides=2), (2, 7, 6)),
        ("Conv", (3, 4, (3, 3)), dict(param_dtype=jnp.bfloat16), (2, 5, 4, 3)),
        ("ConvTranspose", (4, 3, 3), dict(transpose_kernel=True, strides=2), (2, 5, 4)),
    ],
)
def test_default_init_matches_oracle(name, args, kwargs, x_shape):
    ours, ref = _pair(name, *args, default_init=True, seed=7, **kwargs)
    x = _inputs(x_shape)
    _close(ours(x), ref(x))


_SPATIAL = {1: (7,), 2: (5, 6), 3: (4, 3, 5)}
_KERNEL = {1: (3,), 2: (3, 2), 3: (2, 3, 2)}
_PADDINGS = ["SAME", "VALID", "CIRCULAR", "REFLECT", 1, "explicit"]


@pytest.mark.parametrize("ndim,padding", list(itertools.product((1, 2, 3), _PADDINGS)))
def test_conv_matches_oracle(ndim, padding):
    strides = 1 + (ndim + _PADDINGS.index(padding)) % 2
    if padding == "explicit":
        padding = [(1, 0), 2, (0, 1)][:ndim]
    x = _inputs((2, *_SPATIAL[ndim], 4))
    ours, ref = _pair("Conv", 4, 6, _KERNEL[ndim], strides, padding=padding)
    _close(ours(x), ref(x))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_dilation=2),
        dict(kernel_dilation=(1, 2), padding="CIRCULAR"),
        dict(kernel_dilation=2, padding="REFLECT"),
        dict(input_dilation=2, padding=[(1, 1), (0, 2)]),
        dict(input_dilation=(2, 1), strides=(1, 2), padding=0),
        dict(input_dilation=2, kernel_dilation=2, padding=[(2, 1), (0, 0)]),
        dict(feature_group_count=2),
        dict(feature_group_count=4, padding="VALID", strides=2),
        dict(use_bias=False),
        dict(padding="SAME_LOWER", strides=2),
        dict(padding="same"),
        dict(strides=None, input_dilation=None, kernel_dilation=None),
        dict(precision="highest"),
        dict(preferred_element_type=jnp.float32),
        dict(bias_init=nnx.initializers.normal(1.0), kernel_init=nnx.initializers.ones),
    ],
)
def test_conv_options_match_oracle(kwargs):
    x = _inputs((2, 6, 5, 4))
    ours, ref = _pair("Conv", 4, 8, (3, 3), **kwargs)
    _close(ours(x), ref(x))


@pytest.mark.parametrize("dilation", [1, 2])
def test_conv_causal_matches_oracle(dilation):
    x = _inputs((2, 7, 3))
    ours, ref = _pair("Conv", 3, 2, 3, padding="CAUSAL", kernel_dilation=dilation)
    y = ours(x)
    assert y.shape == (2, 7, 2)
    _close(y, ref(x))
    # causality: changing the future does not change the past
    x2 = x.at[:, 4:].set(100.0)
    _close(ours(x2)[:, :4], y[:, :4])


@pytest.mark.parametrize(
    "dtype,param_dtype",
    list(itertools.product([None, jnp.float32, jnp.bfloat16], [jnp.float32, jnp.bfloat16])),
)
def test_conv_dtypes_match_oracle(dtype, param_dtype):
    for in_dtype in (jnp.float32, jnp.bfloat16):
        x = _inputs((1, 5, 5, 2), in_dtype)
        ours, ref = _pair("Conv", 2, 3, (3, 3), dtype=dtype, param_dtype=param_dtype)
        assert ours.kernel[...].dtype == param_dtype
        y = ours(x)
        expected = dtype or jnp.result_type(in_dtype, param_dtype)
        assert y.dtype == expected
        _close(y, ref(x))


@pytest.mark.parametrize(
    "shape",
    [(5, 4), (3, 2, 5, 4), (2, 1, 3, 5, 4)],
    ids=["unbatched", "two-batch-dims", "three-batch-dims"],
)
@pytest.mark.parametrize("name", ["Conv", "ConvTranspose"])
def test_batch_dims_flattened_and_restored(name, shape):
    ours, ref = _pair(name, 4, 3, 3, strides=2)
    x = _inputs(shape)
    y = ours(x)
    assert y.shape[:-2] == shape[:-2]
    _close(y, ref(x))
    if len(shape) > 2:
        flat = ours(x.reshape(-1, *shape[-2:]))
        _close(y.reshape(flat.shape), flat)


def test_mask_multiplies_kernel():
    mask = jnp.tril(jnp.ones((3, 4, 5)))
    x = _inputs((2, 6, 4))
    ours, ref = _pair("Conv", 4, 5, (3,), mask=mask, padding="VALID")
    _close(ours(x), ref(x))
    plain = Conv(4, 5, (3,), padding="VALID", rngs=Rngs(0), **FAST)
    plain.kernel[...] = ours.kernel[...] * mask
    _close(ours(x), plain(x))
    ours_t, ref_t = _pair("ConvTranspose", 4, 5, (3,), mask=mask, padding="VALID")
    _close(ours_t(x), ref_t(x))


def test_metadata_and_attributes():
    kw = dict(padding=[(1, 1), 0], kernel_metadata={"tag": "k"}, **FAST)
    layer = Conv(4, 6, [3, 3], [1, 2], rngs=Rngs(0), **kw)
    assert layer.kernel.tag == "k"
    assert layer.kernel_size == (3, 3)
    assert layer.kernel_shape == (3, 3, 4, 6)
    hash((layer.strides, layer.padding))  # configuration stays hashable
    assert layer(jnp.ones((1, 5, 5, 4))).shape == (1, 5, 2, 6)


@pytest.mark.parametrize("cls,ref_cls", [(Conv, nnx.Conv), (ConvTranspose, nnx.ConvTranspose)])
def test_signature_mirrors_oracle(cls, ref_cls):
    ours = inspect.signature(cls.__init__).parameters
    ref = inspect.signature(ref_cls.__init__).parameters
    assert list(ours) == list(ref)
    for name, p in ref.items():
        assert ours[name].kind == p.kind, name
        if not callable(p.default) and name not in ("param_dtype",):
            assert ours[name].default == p.default, name
    assert list(inspect.signature(cls.__call__).parameters) == list(
        inspect.signature(ref_cls.__call__).parameters
    )


# ConvTranspose vs oracle
@pytest.mark.parametrize("transpose_kernel", [False, True])
@pytest.mark.parametrize("padding", ["SAME", "VALID", "CIRCULAR", 2])
@pytest.mark.parametrize("ndim,strides", [(1, 3), (2, (1, 2))])
def test_conv_transpose_matches_oracle(ndim, strides, padding, transpose_kernel):
    x = _inputs((2, *_SPATIAL[ndim], 3))
    kernel = {1: (4,), 2: (3, 4)}[ndim]
    ours, ref = _pair(
        "ConvTranspose", 3, 5, kernel, strides, padding=padding, transpose_kernel=transpose_kernel
    )
    _close(ours(x), ref(x))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_dilation=2),
        dict(kernel_dilation=(2, 1), padding="CIRCULAR", strides=(2, 3)),
        dict(padding=[(0, 1), (2, 2)], strides=2, use_bias=False),
        dict(padding="SAME_LOWER"),
        dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
        dict(param_dtype=jnp.bfloat16),
    ],
)
def test_conv_transpose_options_match_oracle(kwargs):
    x = _inputs((2, 4, 5, 3))
    ours, ref = _pair("ConvTranspose", 3, 2, (3, 3), **kwargs)
    _close(ours(x), ref(x))


def test_conv_transpose_3d_and_circular_shape():
    x = _inputs((1, 3, 2, 3, 2))
    ours, ref = _pair("ConvTranspose", 2, 3, (2, 3, 2), strides=2, padding="CIRCULAR")
    y = ours(x)
    assert y.shape == (1, 6, 4, 6, 3)
    _close(y, ref(x))


# independent NumPy references
def np_conv(x, w, strides, pads, lhs_dilation, rhs_dilation, groups=1):
    """Direct N-D channels-last convolution (cross-correlation) with explicit sums."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n = x.ndim - 2
    dil_in = np.zeros((x.shape[0], *[(s - 1) * d + 1 for s, d in zip(x.shape[1:-1], lhs_dilation)],
                       x.shape[-1]))  # fmt: skip
    dil_in[(slice(None), *[slice(None, None, d) for d in lhs_dilation])] = x
    xp = np.pad(dil_in, [(0, 0), *pads, (0, 0)])
    dk = [(k - 1) * d + 1 for k, d in zip(w.shape[:n], rhs_dilation)]
    out_sp = [(p - k) // s + 1 for p, k, s in zip(xp.shape[1:-1], dk, strides)]
    cin, cout = w.shape[-2], w.shape[-1]
    out = np.zeros((x.shape[0], *out_sp, cout))
    for pos in itertools.product(*map(range, out_sp)):
        for kpos in itertools.product(*(range(k) for k in w.shape[:n])):
            idx = tuple(p * s + k * d for p, s, k, d in zip(pos, strides, kpos, rhs_dilation))
            vec = xp[(slice(None), *idx)]  # (N, C)
            for g in range(groups):
                o = slice(g * cout // groups, (g + 1) * cout // groups)
                contrib = vec[:, g * cin : (g + 1) * cin] @ w[(*kpos, slice(None), o)]
                out[(slice(None), *pos, o)] += contrib
    return out


def _same_pads(sizes, dk, strides):
    pads = []
    for size, k, s in zip(sizes, dk, strides):
        total = max((-(-size // s) - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def test_conv1d_is_explicit_sum():
    x = _inputs((1, 6, 2))
    layer = Conv(2, 3, 3, padding="VALID", rngs=Rngs(3), **FAST)
    w, b = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
    xn = np.asarray(x)
    want = np.stack(
        [sum(xn[0, t + j] @ w[j] for j in range(3)) + b for t in range(4)]
    )  # y[t] = sum_j x[t + j] @ w[j] + b
    _close(layer(x)[0], want.astype(np.float32))


@pytest.mark.parametrize(
    "strides,padding,lhs,rhs,groups",
    [
        ((1, 1), "SAME", (1, 1), (1, 1), 1),
        ((2, 1), "VALID", (1, 1), (2, 1), 2),
        ((1, 2), [(2, 0), (1, 1)], (2, 1), (1, 1), 1),
        ((2, 2), "SAME", (1, 2), (1, 2), 4),  # string padding + input dilation: not in lax
        ((1, 2), "VALID", (3, 2), (1, 1), 1),
    ],
)
def test_conv2d_vs_numpy(strides, padding, lhs, rhs, groups):
    x = _inputs((2, 5, 4, 4))
    layer = Conv(
        4,
        8,
        (3, 2),
        strides,
        padding=padding,
        input_dilation=lhs,
        kernel_dilation=rhs,
        feature_group_count=groups,
        rngs=Rngs(0),
        **FAST,
    )
    dil = [(s - 1) * d + 1 for s, d in zip(x.shape[1:-1], lhs)]
    dk = [(k - 1) * d + 1 for k, d in zip((3, 2), rhs)]
    pads = _same_pads(dil, dk, strides) if padding == "SAME" else padding
    pads = [(0, 0)] * 2 if padding == "VALID" else pads
    want = np_conv(x, layer.kernel[...], strides, pads, lhs, rhs, groups) + np.asarray(
        layer.bias[...]
    )
    _close(layer(x), want.astype(np.float32), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode,np_mode", [("CIRCULAR", "wrap"), ("REFLECT", "reflect")])
def test_boundary_modes_vs_numpy(mode, np_mode):
    x = _inputs((1, 5, 2))
    layer = Conv(2, 2, 4, padding=mode, use_bias=False, rngs=Rngs(0), **FAST)
    xp = np.pad(np.asarray(x), [(0, 0), (1, 2), (0, 0)], mode=np_mode)
    want = np_conv(xp, layer.kernel[...], (1,), [(0, 0)], (1,), (1,))
    _close(layer(x), want.astype(np.float32), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("transpose_kernel", [False, True])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (3, 2), (2, 3)])
def test_conv_transpose_1d_is_scatter(stride, dilation, transpose_kernel):
    x = _inputs((1, 4, 2))
    layer = ConvTranspose(
        2, 3, 3, stride, padding="VALID", kernel_dilation=dilation, use_bias=False,
        transpose_kernel=transpose_kernel, rngs=Rngs(0), **FAST,
    )  # fmt: skip
    w = np.asarray(layer.kernel[...], np.float64)
    w = np.swapaxes(w, -1, -2) if transpose_kernel else w[::-1]  # (k, in, out)
    dk = 2 * dilation + 1
    out = np.zeros((max(3 * stride + dk, 4 * stride), 3))
    for i in range(4):
        for j in range(3):
            out[i * stride + j * dilation] += np.asarray(x)[0, i] @ w[j]
    _close(layer(x)[0], out.astype(np.float32), rtol=1e-4, atol=1e-5)


# gradients
@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("Conv", dict(strides=2, padding="CIRCULAR", feature_group_count=2)),
        ("Conv", dict(kernel_dilation=2, padding="REFLECT", mask=jnp.ones((3, 3, 4, 4)))),
        ("ConvTranspose", dict(strides=2, padding="CIRCULAR", transpose_kernel=True)),
    ],
)
def test_grads_match_oracle(name, kwargs):
    x = _inputs((2, 5, 6, 4))
    ours, ref = _pair(name, 4, 4, (3, 3), **kwargs)
    k0, b0 = ours.kernel[...], ours.bias[...]

    def loss(module_cls, rngs_cls):
        def f(kernel, bias, x):
            init = dict(kernel_init=lambda *_: kernel, bias_init=lambda *_: bias)
            m = module_cls(4, 4, (3, 3), rngs=rngs_cls(0), **init, **kwargs)
            return jnp.sum(jnp.sin(m(x)))

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(k0, b0, x)

    got = loss(type(ours), Rngs)
    want = loss(type(ref), nnx.Rngs)
    for g, h in zip(got, want):
        _close(g, h, rtol=1e-5, atol=1e-5)


def test_grads_finite_differences():
    layer = Conv(2, 2, (2, 2), strides=(1, 2), padding="CIRCULAR", rngs=Rngs(0), **FAST)
    f = lambda x: jnp.tanh(layer(x))
    check_grads(
        f, (_inputs((1, 3, 4, 2)),), order=1, modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-2
    )


# canonicalize_padding and errors
@pytest.mark.parametrize(
    "padding,rank",
    [("SAME", 2), ("CIRCULAR", 1), (3, 2), ([1, (2, 3)], 2), (((0, 1), (1, 0), 2), 3), ([4], 1)],
)
def test_canonicalize_padding_matches_oracle(padding, rank):
    from flax.nnx.nn.linear import canonicalize_padding as ref_canonicalize

    assert canonicalize_padding(padding, rank) == ref_canonicalize(padding, rank)


@pytest.mark.parametrize("padding,rank", [([1, 2], 1), ([(1, 2, 3)], 1), (1.5, 1), ([None], 1)])
def test_canonicalize_padding_rejects(padding, rank):
    with pytest.raises(ValueError, match="Invalid padding format"):
        canonicalize_padding(padding, rank)


_T = ConvTranspose


@pytest.mark.parametrize(
    "cls,args,kwargs,shape,match",
    [
        (Conv, (3, 4, (3, 3)), {}, (5, 3), r"Conv .*rank >= 3.*\(5, 3\)"),
        (Conv, (3, 4, 3), {}, (1, 5, 2), r"in_features=3.*\(1, 5, 2\)"),
        (_T, (3, 4, 3), {}, (1, 5, 2), r"ConvTranspose.*in_features"),
        (_T, (3, 4, (2, 2)), {}, (4, 3), r"ConvTranspose .*rank >= 3"),
        (Conv, (3, 4, 5), dict(padding="VALID"), (1, 3, 3), "no complete kernel"),
        (Conv, (3, 4, 2), dict(padding=-2), (1, 3, 3), "no complete kernel"),
        (_T, (3, 4, 3), dict(padding=-3), (1, 2, 3), "no complete"),
    ],
)
def test_bad_inputs_raise_value_error(cls, args, kwargs, shape, match):
    layer = cls(*args, rngs=Rngs(0), **FAST, **kwargs)
    with pytest.raises(ValueError, match=match):
        layer(jnp.ones(shape))


@pytest.mark.parametrize(
    "cls,args,kwargs,shape,match",
    [
        (Conv, (3, 4, 2), dict(padding="FULL"), (1, 3, 3), "Conv: unknown padding"),
        (Conv, (3, 4, (2, 2)), dict(padding="CAUSAL"), (1, 3, 3, 3), "only implemented for 1-D"),
        (Conv, (3, 4, 2), dict(padding=[1, 1]), (1, 3, 3), "Conv: Invalid padding"),
        (Conv, (3, 4, 2), dict(strides=(1, 2)), (1, 3, 3), "Conv: strides must be"),
        (_T, (3, 4, 2), dict(padding="CAUSAL"), (1, 3, 3), "unsupported padding 'CAUSAL'"),
        (_T, (3, 4, 2), dict(padding="SAME_LOWER", strides=2), (1, 3, 3), "unit strides"),
    ],
)
def test_bad_config_raises_at_construction_and_at_call(cls, args, kwargs, shape, match):
    # Configurations no input can fit are rejected when the layer is built; the same values
    # set on a built layer afterwards are still rejected when it is called.
    with pytest.raises(ValueError, match=match):
        cls(*args, rngs=Rngs(0), **FAST, **kwargs)
    layer = cls(*args, rngs=Rngs(0), **FAST)
    for name, value in kwargs.items():
        setattr(layer, name, tuple(value) if isinstance(value, list) else value)
    with pytest.raises(ValueError, match=match):
        layer(jnp.ones(shape))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(in_features=5, feature_group_count=2), "feature_group_count=2 must divide in_feat"),
        (dict(out_features=3, feature_group_count=2), "must divide out_features=3"),
        (dict(feature_group_count=0), "positive int"),
        (dict(kernel_size=(3, 0)), "kernel_size"),
        (dict(mask=jnp.ones((3, 3))), r"mask .*expected \(3, 4, 6\)"),
    ],
)
def test_bad_construction_raises_value_error(kwargs, match):
    args = dict(in_features=4, out_features=6, kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=match):
        Conv(**args, rngs=Rngs(0), **FAST)
