"""Tests for nnx.EMA (refax/training/ema.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from refax import nnx


def test_ema_update_formula():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    k0, b0 = np.asarray(model.kernel[...]), np.asarray(model.bias[...])
    ema = nnx.EMA(model, decay=0.8)
    np.testing.assert_allclose(ema.params["kernel"][...], k0)
    assert ema.params["kernel"] is not model.kernel
    model.kernel[...] = model.kernel[...] * 3.0
    model.bias[...] = model.bias[...] + 1.0
    ema.update(model)
    np.testing.assert_allclose(ema.params["kernel"][...], 0.8 * k0 + 0.2 * 3 * k0, rtol=1e-6)
    np.testing.assert_allclose(ema.params["bias"][...], b0 + 0.2, rtol=1e-6)
    ema.update(nnx.state(model))  # a State works too
    np.testing.assert_allclose(
        ema.params["bias"][...], 0.8 * (b0 + 0.2) + 0.2 * (b0 + 1), rtol=1e-6
    )


def test_ema_only_filter_and_types():
    model = nnx.BatchNorm(2, rngs=nnx.Rngs(0))
    ema = nnx.EMA(model, decay=0.5, only=nnx.Param)
    assert sorted(nnx.to_pure_dict(ema.params)) == ["bias", "scale"]
    assert isinstance(ema.params["scale"], nnx.Param)
    with pytest.raises(ValueError, match="decay"):
        nnx.EMA(model, decay=1.5)


def test_ema_inside_jit_matches_manual_average():
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    ema = nnx.EMA(model, decay=0.9, only=nnx.Param)
    averaged = ema.apply_to(model)
    x = jnp.ones((1, 2))

    @nnx.jit
    def step(model, opt, ema):
        grads = nnx.grad(lambda m: m(x).sum())(model)
        opt.update(model, grads)
        ema.update(model)

    expected = np.asarray(model.bias[...])
    for _ in range(3):
        step(model, opt, ema)
        expected = 0.9 * expected + 0.1 * np.asarray(model.bias[...])
    np.testing.assert_allclose(ema.params["bias"][...], expected, rtol=1e-6)
    assert averaged.bias is ema.params["bias"]  # apply_to stays live through jit updates
    assert averaged.kernel is not model.kernel
    np.testing.assert_allclose(averaged(x), x @ averaged.kernel[...] + expected, rtol=1e-6)


def test_ema_sharding_kept():
    mesh = jax.make_mesh((2, 2), ("row", "col"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("row", "col"))
        model = nnx.Linear(4, 2, use_bias=False, kernel_init=init, rngs=nnx.Rngs(0))
        ema = nnx.EMA(model, decay=0.9)
    assert ema.params["kernel"][...].sharding.is_equivalent_to(model.kernel[...].sharding, 2)


def test_ema_errors_on_other_structure():
    ema = nnx.EMA(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), decay=0.9)
    with pytest.raises(ValueError, match="kernel"):
        ema.update(nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="apply_to"):
        ema.apply_to(nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
