"""BatchNorm, LayerNorm, RMSNorm, GroupNorm: oracle parity, reference math, gradients, modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as F

from refax import nnx
from refax._rngs import Rngs
from refax.nn import BatchNorm, GroupNorm, LayerNorm, RMSNorm, initializers
from tests.nn._compare import assert_same_attrs, assert_same_output, grads

# (dtype, param_dtype): inferred, explicit up-cast and explicit down-cast computations.
DTYPE_PRODUCT = [
    (None, jnp.float32),
    (None, jnp.bfloat16),
    (jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32),
]
LAYERS = {
    "BatchNorm": BatchNorm,
    "LayerNorm": LayerNorm,
    "RMSNorm": RMSNorm,
    "GroupNorm": GroupNorm,
}
X = jax.random.normal(jax.random.key(7), (4, 3, 6)) * 2.0 + 0.5
RANDOM_INIT = initializers.normal(1.0)


def make(name, lib, *, rngs_seed=0, **kw):
    """Builds layer ``name`` from ``lib`` (refax or the oracle) with random scale/bias."""
    args = (6, 3) if name == "GroupNorm" else (6,)
    kw.setdefault("scale_init", RANDOM_INIT)
    if name != "RMSNorm":
        kw.setdefault("bias_init", RANDOM_INIT)
    if lib == "oracle":
        return getattr(F, name)(*args, **kw, rngs=F.Rngs(rngs_seed))
    return LAYERS[name](*args, **kw, rngs=Rngs(rngs_seed))


def param_names(name):
    return {"BatchNorm": ["scale", "bias", "mean", "var"], "RMSNorm": ["scale"]}.get(
        name, ["scale", "bias"]
    )


# -- oracle parity ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PRODUCT)
def test_matches_oracle(name, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    ref, mine = make(name, "oracle", **kw), make(name, "refax", **kw)
    names = param_names(name)
    assert_same_attrs(ref, mine, names)
    for x in (X, X.astype(jnp.bfloat16)):
        assert_same_output(ref(x), mine(x))
        assert_same_attrs(ref, mine, names)  # BatchNorm: same running statistics
    if name == "BatchNorm":
        assert_same_output(ref(X, use_running_average=True), mine(X, use_running_average=True))


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("use_fast_variance", [True, False])
def test_mask_and_variance_formula_match_oracle(name, use_fast_variance):
    mask = jnp.arange(X.size).reshape(X.shape) % 5 != 0
    kw = dict(use_fast_variance=use_fast_variance)
    ref, mine = make(name, "oracle", **kw), make(name, "refax", **kw)
    assert_same_output(ref(X, mask=mask), mine(X, mask=mask))
    assert_same_attrs(ref, mine, param_names(name))


@pytest.mark.parametrize(
    "name,kw",
    [
        ("BatchNorm", dict(axis=1)),
        ("BatchNorm", dict(use_bias=False, use_scale=False)),
        ("LayerNorm", dict(reduction_axes=(1, 2))),
        ("LayerNorm", dict(use_bias=False, epsilon=1e-3)),
        ("RMSNorm", dict(reduction_axes=(-2, -1), use_scale=False)),
        ("GroupNorm", dict(reduction_axes=(-2, -1))),
    ],
)
def test_options_match_oracle(name, kw):
    x = X if kw.get("axis") != 1 else jnp.swapaxes(X, 1, 2)
    ref, mine = make(name, "oracle", **kw), make(name, "refax", **kw)
    assert_same_attrs(ref, mine, param_names(name))
    assert_same_output(ref(x), mine(x))
    assert_same_attrs(ref, mine, param_names(name))


def test_group_norm_group_size_and_4d_inputs():
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 8))
    ref = F.GroupNorm(8, num_groups=None, group_size=2, rngs=F.Rngs(0))
    mine = GroupNorm(8, num_groups=None, group_size=2, rngs=Rngs(0))
    assert (mine.num_groups, mine.group_size) == (4, 2)
    assert_same_output(ref(x), mine(x))


def test_keys_consumed_like_oracle():
    for name in LAYERS:
        for kw in ({}, {"use_scale": False}):
            if name == "RMSNorm" and kw:
                continue
            ref_rngs, rngs = F.Rngs(0), Rngs(0)
            args = (6, 3) if name == "GroupNorm" else (6,)
            getattr(F, name)(*args, **kw, rngs=ref_rngs)
            LAYERS[name](*args, **kw, rngs=rngs)
            assert int(rngs.default.count[...]) == int(ref_rngs.default.count[...]), name


# -- reference math and gradients -------------------------------------------------------------
def ref_norm(x, axes, scale, bias, eps, center=True):
    mean = x.mean(axes, keepdims=True) if center else 0.0
    var = ((x - mean) ** 2).mean(axes, keepdims=True)
    y = (x - mean) / jnp.sqrt(var + eps) * scale
    return y + bias if bias is not None else y


def ref_group_norm(x, groups, scale, bias, eps):
    g = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
    axes = (*range(1, x.ndim - 1), x.ndim)
    mean = g.mean(axes, keepdims=True)
    var = ((g - mean) ** 2).mean(axes, keepdims=True)
    return ((g - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias


def reference(name, m, x, scale, bias):
    if name == "BatchNorm":
        return ref_norm(x, (0, 1), scale, bias, m.epsilon)
    if name == "LayerNorm":
        return ref_norm(x, -1, scale, bias, m.epsilon)
    if name == "RMSNorm":
        return ref_norm(x, -1, scale, None, m.epsilon, center=False)
    return ref_group_norm(x, m.num_groups, scale, bias, m.epsilon)


@pytest.mark.parametrize("name", list(LAYERS))
def test_reference_math_and_grads(name):
    m = make(name, "refax")
    scale = m.scale[...]
    bias = m.bias[...] if name != "RMSNorm" else None
    np.testing.assert_allclose(m(X), reference(name, m, X, scale, bias), rtol=1e-4, atol=1e-4)

    def loss(m, x):
        return jnp.sum(jnp.sin(m(x)))

    g_state, g_x = grads(m, loss, X)
    if name == "RMSNorm":
        ref = jax.grad(lambda s, x: jnp.sum(jnp.sin(reference(name, m, x, s, None))), (0, 1))
        ref_s, ref_x = ref(scale, X)
    else:
        ref = jax.grad(lambda s, b, x: jnp.sum(jnp.sin(reference(name, m, x, s, b))), (0, 1, 2))
        ref_s, ref_b, ref_x = ref(scale, bias, X)
        np.testing.assert_allclose(g_state["bias"][...], ref_b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_state["scale"][...], ref_s, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_x, ref_x, rtol=1e-3, atol=1e-3)


# -- BatchNorm modes ------------------------------------------------------------------------
def test_batch_norm_running_stats_train_then_eval():
    bn = BatchNorm(6, momentum=0.9, rngs=Rngs(0))
    assert isinstance(bn.mean, nnx.BatchStat) and isinstance(bn.var, nnx.BatchStat)
    np.testing.assert_array_equal(bn.mean[...], jnp.zeros(6))
    np.testing.assert_array_equal(bn.var[...], jnp.ones(6))
    bn(X)
    batch_mean, batch_var = X.mean((0, 1)), X.var((0, 1))
    np.testing.assert_allclose(bn.mean[...], 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * batch_var, rtol=1e-5)

    class Model(nnx.Module):
        def __init__(self):
            self.bn = bn

    model = Model()
    model.eval()
    assert bn.use_running_average is True
    mean, var = bn.mean[...], bn.var[...]
    y = bn(X)
    np.testing.assert_allclose(y, (X - mean) / jnp.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(bn.mean[...], mean)  # eval mode leaves stats alone
    model.train()
    assert bn.use_running_average is False
    bn(X)
    assert not np.allclose(bn.mean[...], mean)


def test_batch_norm_call_override_and_view_hook():
    bn = BatchNorm(6, use_running_average=True, rngs=Rngs(0))
    bn(X, use_running_average=False)
    assert not np.allclose(bn.mean[...], 0.0)
    bn.set_view(use_running_average=None)  # None leaves it unchanged
    assert bn.use_running_average is True
    bn.set_view(use_running_average=False)
    assert bn.use_running_average is False


def test_batch_norm_axis_name_under_vmap():
    x = X.reshape(12, 6)
    bn, whole = BatchNorm(6, axis_name="batch", rngs=Rngs(0)), BatchNorm(6, rngs=Rngs(0))
    graphdef, state = nnx.split(bn)

    def per_example(state, xi):
        return nnx.merge(graphdef, state)(xi)

    y = jax.vmap(per_example, in_axes=(None, 0), axis_name="batch")(state, x)
    np.testing.assert_allclose(y, whole(x), rtol=1e-5, atol=1e-5)
    ref = F.BatchNorm(6, axis_name="batch", rngs=F.Rngs(0))
    y_ref = F.vmap(lambda m, xi: m(xi), in_axes=(None, 0), axis_name="batch")(ref, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)


def test_layer_norm_axis_name_under_vmap():
    x = X.reshape(12, 6)
    ln = LayerNorm(6, reduction_axes=(), feature_axes=-1, axis_name="i", rngs=Rngs(0))
    whole = LayerNorm(6, reduction_axes=0, feature_axes=-1, rngs=Rngs(0))
    graphdef, state = nnx.split(ln)
    y = jax.vmap(lambda s, xi: nnx.merge(graphdef, s)(xi), (None, 0), axis_name="i")(state, x)
    np.testing.assert_allclose(y, whole(x), rtol=1e-5, atol=1e-5)


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYERS))
def test_wrong_feature_size(name):
    m = make(name, "refax")
    with pytest.raises(ValueError, match=rf"{name} expects num_features=6.*\(4, 5\)"):
        m(jnp.ones((4, 5)))
    with pytest.raises(ValueError, match=f"{name} expects inputs of rank >= 1"):
        m(jnp.ones(()))


def test_batch_norm_needs_mode():
    bn = BatchNorm(6, use_running_average=None, rngs=Rngs(0))
    with pytest.raises(ValueError, match="use_running_average.*BatchNorm"):
        bn(X)


@pytest.mark.parametrize(
    "num_groups,group_size,match",
    [
        (None, None, "either `num_groups` or `group_size`"),
        (2, 3, "either `num_groups` or `group_size`"),
        (None, 4, r"features \(6\) is not multiple of the group size \(4\)"),
        (4, None, r"number of groups \(4\) does not divide the number of channels \(6\)"),
        (0, None, r"GroupNorm: num_groups must be a positive integer, got 0"),
        (None, 0, r"GroupNorm: group_size must be a positive integer, got 0"),
    ],
)
def test_group_norm_config_errors(num_groups, group_size, match):
    with pytest.raises(ValueError, match=match):
        GroupNorm(6, num_groups=num_groups, group_size=group_size, rngs=Rngs(0))


def test_group_norm_reduction_axes_must_include_features():
    gn = GroupNorm(6, num_groups=3, reduction_axes=(1,), rngs=Rngs(0))
    with pytest.raises(ValueError, match="GroupNorm: reduction_axes"):
        gn(X)


def test_metadata_passed_to_params():
    bn = BatchNorm(
        6,
        scale_metadata={"sharding_names": ("f",)},
        bias_metadata={"sharding_names": ("g",)},
        rngs=Rngs(0),
    )
    assert bn.scale.sharding_names == ("f",) and bn.bias.sharding_names == ("g",)
    rms = RMSNorm(6, scale_metadata={"sharding_names": ("h",)}, rngs=Rngs(0))
    assert rms.scale.sharding_names == ("h",)
