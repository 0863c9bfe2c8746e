"""InstanceNorm, WeightNorm, SpectralNorm: oracle parity, jax.numpy reference math, modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as F

from refax import nnx
from refax.nn import InstanceNorm, SpectralNorm, WeightNorm, initializers
from tests._oracle import assert_trees_close, pure

X = jax.random.normal(jax.random.key(3), (2, 5, 3)) * 1.5 + 0.3
DTYPE_PRODUCT = [
    (None, jnp.float32),
    (None, jnp.bfloat16),
    (jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32),
]


def f32(x):
    return np.asarray(x, np.float32)


def assert_same(a, b, rtol=1e-6, atol=1e-6):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    np.testing.assert_allclose(f32(a), f32(b), rtol=rtol, atol=atol)


def same_state(ref, mine):
    assert_trees_close(pure(F, ref), pure(nnx, mine), rtol=1e-6, atol=1e-7)


# -- InstanceNorm -------------------------------------------------------------------------------
def make_instance(lib, features=3, **kw):
    init = lib.initializers.normal(1.0)
    cls = F.InstanceNorm if lib is F else InstanceNorm
    return cls(features, scale_init=init, bias_init=init, rngs=lib.Rngs(0), **kw)


@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PRODUCT)
@pytest.mark.parametrize("use_fast_variance", [True, False])
def test_instance_norm_matches_oracle(dtype, param_dtype, use_fast_variance):
    kw = dict(dtype=dtype, param_dtype=param_dtype, use_fast_variance=use_fast_variance)
    ref, mine = make_instance(F, **kw), make_instance(nnx, **kw)
    same_state(ref, mine)
    for x in (X, X.astype(jnp.bfloat16)):
        assert_same(ref(x), mine(x))


@pytest.mark.parametrize(
    "shape,features,feature_axes",
    [((2, 4, 5, 3), 3, -1), ((2, 3, 4, 5), 3, 1), ((2, 4, 5, 3), 15, (2, 3))],
)
def test_instance_norm_axes_and_mask_match_oracle(shape, features, feature_axes):
    x = jax.random.normal(jax.random.key(1), shape)
    mask = jax.random.bernoulli(jax.random.key(2), 0.7, shape)
    ref = make_instance(F, features, feature_axes=feature_axes)
    mine = make_instance(nnx, features, feature_axes=feature_axes)
    assert_same(ref(x), mine(x))
    assert_same(ref(x, mask=mask), mine(x, mask=mask))


def test_instance_norm_reference_math():
    x = jax.random.normal(jax.random.key(4), (2, 4, 5, 3)) * 3 + 1
    norm = make_instance(nnx)
    mean = x.mean(axis=(1, 2), keepdims=True)
    var = x.var(axis=(1, 2), keepdims=True)
    expected = (x - mean) / jnp.sqrt(var + 1e-6) * norm.scale[...] + norm.bias[...]
    np.testing.assert_allclose(norm(x), expected, rtol=1e-5, atol=1e-5)
    # one group per channel in GroupNorm is the same normalization
    group = nnx.GroupNorm(3, num_groups=3, rngs=nnx.Rngs(0))
    plain = InstanceNorm(3, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(plain(x), group(x), atol=1e-5)


def test_instance_norm_options_and_errors():
    norm = InstanceNorm(3, use_bias=False, use_scale=False, rngs=nnx.Rngs(0))
    assert norm.scale is None and norm.bias is None
    assert not nnx.state(norm, nnx.Param)
    with pytest.raises(ValueError, match="batch axis"):
        InstanceNorm(2, feature_axes=0, rngs=nnx.Rngs(0))(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="num_features=4"):
        InstanceNorm(4, rngs=nnx.Rngs(0))(jnp.ones((2, 3)))


def test_instance_norm_grads_match_oracle():
    def grads(lib, model):
        graphdef, params = lib.split(model, lib.Param)
        return jax.grad(lambda p: (lib.merge(graphdef, p)(X) ** 3).sum())(params)

    assert_trees_close(
        pure(F, grads(F, make_instance(F))), pure(nnx, grads(nnx, make_instance(nnx))), 1e-5
    )


# -- WeightNorm ---------------------------------------------------------------------------------
def make_wrapped(lib, wrapper, layer="linear", **kw):
    rngs = lib.Rngs(0)
    if layer == "linear":
        inner = lib.Linear(3, 4, bias_init=lib.initializers.normal(1.0), rngs=rngs)
    else:
        inner = lib.Conv(3, 4, (2, 2), rngs=rngs)
    cls = getattr(F, wrapper) if lib is F else {"WeightNorm": WeightNorm}.get(wrapper, SpectralNorm)
    return cls(inner, rngs=rngs, **kw)


def inputs(layer):
    return X if layer == "linear" else jax.random.normal(jax.random.key(5), (2, 4, 4, 3))


WEIGHT_NORM_CASES = [
    ("linear", {}),
    ("linear", dict(feature_axes=None)),
    ("linear", dict(feature_axes=0)),
    ("linear", dict(use_scale=False)),
    ("linear", dict(dtype=jnp.bfloat16)),
    ("linear", dict(variable_filter=nnx.PathContains("bias"))),
    ("conv", {}),
    ("conv", dict(feature_axes=(-2, -1))),
]


@pytest.mark.parametrize("layer,kw", WEIGHT_NORM_CASES)
def test_weight_norm_matches_oracle(layer, kw):
    fkw = dict(kw)
    if "variable_filter" in kw:
        fkw["variable_filter"] = F.PathContains("bias")
    ref, mine = (
        make_wrapped(F, "WeightNorm", layer, **fkw),
        make_wrapped(nnx, "WeightNorm", layer, **kw),
    )
    same_state(ref, mine)
    assert sorted(mine.scales or {}) == sorted(ref.scales or {})
    x = inputs(layer)
    for _ in range(2):  # the second call normalizes the already normalized weights
        assert_same(ref(x), mine(x), rtol=2e-6)
        same_state(ref, mine)


def test_weight_norm_reference_math_and_in_place_update():
    wn = WeightNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    wn.scales[("kernel",)] = jnp.arange(1.0, 5.0)
    w, b = wn.layer_instance.kernel[...], wn.layer_instance.bias[...]
    w_bar = w / jnp.linalg.norm(w, axis=0) * jnp.arange(1.0, 5.0)
    np.testing.assert_allclose(wn(X), X @ w_bar + b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(wn.layer_instance.kernel[...], w_bar, rtol=1e-6)  # in place
    np.testing.assert_allclose(
        jnp.linalg.norm(wn.layer_instance.kernel[...], axis=0), [1, 2, 3, 4], 1e-5
    )


def test_weight_norm_grad_flows_through_normalization():
    wn = WeightNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    w, b, s = wn.layer_instance.kernel[...], wn.layer_instance.bias[...], wn.scales[("kernel",)]

    def reference(w):
        return jnp.sum((X @ (w / jnp.linalg.norm(w, axis=0) * s) + b) ** 2)

    grads = nnx.grad(lambda m: jnp.sum(m(X) ** 2))(wn)
    np.testing.assert_allclose(
        grads["layer_instance"]["kernel"][...], jax.grad(reference)(w), 1e-4, 1e-5
    )
    assert "scales" not in grads  # the scales are plain arrays, not Params


def test_weight_norm_rngs_and_initializers():
    rngs = nnx.Rngs(0)
    wn = WeightNorm(nnx.Linear(3, 4, rngs=rngs), rngs=rngs)
    frngs = F.Rngs(0)
    F.WeightNorm(F.Linear(3, 4, rngs=frngs), rngs=frngs)
    # no key consumed, as in the oracle: later layers get the same keys
    assert int(rngs.params.count[...]) == int(frngs.params.count[...]) == 2  # kernel, bias
    np.testing.assert_allclose(
        nnx.Linear(2, 2, rngs=rngs).kernel[...], F.Linear(2, 2, rngs=frngs).kernel[...]
    )
    # a random scale_init works (the oracle passes it a stream, which fails)
    wn = WeightNorm(nnx.Linear(3, 4, rngs=rngs), scale_init=initializers.normal(1.0), rngs=rngs)
    scale = wn.scales[("kernel",)]
    assert scale.shape == (4,) and len(set(np.asarray(scale).tolist())) == 4
    assert WeightNorm(nnx.Linear(3, 4, rngs=rngs), use_scale=False, rngs=rngs).scales is None


def test_weight_norm_changed_layer_errors():
    wn = WeightNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    wn.layer_instance.sub = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(RuntimeError, match="'sub', 'kernel'.*changed after the wrapper"):
        wn(X)


# -- SpectralNorm -------------------------------------------------------------------------------
SPECTRAL_CASES = [
    ("linear", {}),
    ("linear", dict(n_steps=5)),
    ("linear", dict(update_stats=False)),
    ("linear", dict(param_dtype=jnp.bfloat16)),
    ("linear", dict(dtype=jnp.bfloat16)),
    ("conv", {}),
    ("conv", dict(n_steps=3)),
]


@pytest.mark.parametrize("layer,kw", SPECTRAL_CASES)
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")  # oracle, bf16
def test_spectral_norm_matches_oracle(layer, kw):
    ref, mine = (
        make_wrapped(F, "SpectralNorm", layer, **kw),
        make_wrapped(nnx, "SpectralNorm", layer, **kw),
    )
    same_state(ref, mine)
    assert list(mine.batch_stats) == list(ref.batch_stats)
    x = inputs(layer)
    for _ in range(3):
        assert_same(ref(x), mine(x), rtol=1e-5, atol=1e-5)
        assert_trees_close(pure(F, ref), pure(nnx, mine), rtol=1e-5, atol=1e-6)


def test_spectral_norm_reference_math():
    sn = SpectralNorm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), n_steps=50, rngs=nnx.Rngs(1))
    w = np.asarray(sn.layer_instance.kernel[...])
    top = np.linalg.svd(w, compute_uv=False)[0]
    y = sn(X[..., :1].repeat(4, -1)[0])
    assert y.shape == (5, 3)
    np.testing.assert_allclose(sn.batch_stats[("kernel", "sigma")][...], top, rtol=1e-4)
    np.testing.assert_allclose(sn.layer_instance.kernel[...], w / top, rtol=1e-4)
    assert np.linalg.svd(np.asarray(sn.layer_instance.kernel[...]), compute_uv=False)[
        0
    ] == pytest.approx(1, rel=1e-4)
    u = sn.batch_stats[("kernel", "u")][...]
    np.testing.assert_allclose(jnp.linalg.norm(u), 1.0, rtol=1e-5)


def test_spectral_norm_modes_and_state():
    sn = SpectralNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    assert sorted(nnx.state(sn, nnx.BatchStat)["batch_stats"]) == [
        ("kernel", "sigma"),
        ("kernel", "u"),
    ]
    assert sn.use_running_average is False
    before = pure(nnx, nnx.state(sn, nnx.BatchStat))
    sn.eval()  # use_running_average=True: the power-iteration state is frozen
    sn(X)
    assert_trees_close(before, pure(nnx, nnx.state(sn, nnx.BatchStat)), rtol=0, atol=0)
    sn.train()
    sn(X)
    u = sn.batch_stats[("kernel", "u")][...]
    assert not (u == before["batch_stats"][("kernel", "u")]).all()
    sn(X, update_stats=False)  # the call argument wins over the attribute
    assert (sn.batch_stats[("kernel", "u")][...] == u).all()
    # vectors (the bias) are not normalized and get no state; n_steps=0 disables everything
    assert ("bias", "u") not in sn.batch_stats
    off = SpectralNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), n_steps=0, rngs=nnx.Rngs(1))
    kernel = off.layer_instance.kernel[...]
    off(X)
    assert off.batch_stats == {} and (off.layer_instance.kernel[...] == kernel).all()


def test_spectral_norm_under_jit_updates_state():
    eager = SpectralNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    jitted = nnx.clone(eager)
    y = eager(X)
    y_jit = nnx.jit(lambda m, x: m(x))(jitted, X)
    np.testing.assert_allclose(y, y_jit, rtol=1e-5, atol=1e-6)
    assert_trees_close(pure(nnx, eager), pure(nnx, jitted), rtol=1e-5, atol=1e-6)


def test_spectral_norm_grad_stops_at_power_iteration():
    sn = SpectralNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    u0 = sn.batch_stats[("kernel", "u")][...]
    w, b = sn.layer_instance.kernel[...], sn.layer_instance.bias[...]

    def reference(w):
        v = jax.lax.stop_gradient(_l2n(u0 @ w.T))
        u = jax.lax.stop_gradient(_l2n(v @ w))
        sigma = (v @ w @ u.T)[0, 0]
        return jnp.sum((X @ (w / sigma) + b) ** 2)

    grads = nnx.grad(lambda m: jnp.sum(m(X) ** 2))(sn)
    np.testing.assert_allclose(
        grads["layer_instance"]["kernel"][...], jax.grad(reference)(w), 1e-4, 1e-5
    )


def _l2n(x):
    return x / jnp.sqrt(jnp.sum(x * x) + 1e-12)


def test_spectral_norm_errors():
    conv = nnx.Conv(3, 4, (2, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank 4.*error_on_non_matrix=True"):
        SpectralNorm(conv, error_on_non_matrix=True, rngs=nnx.Rngs(1))
    sn = SpectralNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    sn.layer_instance.other = nnx.Param(jnp.ones((3, 3)))
    with pytest.raises(RuntimeError, match="'other'.*changed after the wrapper"):
        sn(X)


def test_wrappers_rng_keys_match_oracle():
    rngs, frngs = nnx.Rngs(3), F.Rngs(3)
    SpectralNorm(nnx.Conv(3, 4, (2,), rngs=rngs), rngs=rngs)
    F.SpectralNorm(F.Conv(3, 4, (2,), rngs=frngs), rngs=frngs)
    assert int(rngs.params.count[...]) == int(frngs.params.count[...]) == 3
