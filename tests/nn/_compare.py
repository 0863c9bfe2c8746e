"""Comparison helpers shared by the layer tests (refax vs the oracle or reference math)."""

import jax
import numpy as np

from refax import nnx


def f32(x):
    return np.asarray(x, np.float32)


def assert_same_attrs(ref, mine, names):
    """The named Variables (or None) of two layers agree in shape, dtype and value."""
    for name in names:
        a, b = getattr(ref, name), getattr(mine, name)
        if a is None:
            assert b is None, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(f32(a[...]), f32(b[...]), rtol=1e-6, err_msg=name)


def assert_same_output(ya, yb):
    assert ya.shape == yb.shape and ya.dtype == yb.dtype
    np.testing.assert_allclose(f32(ya), f32(yb), rtol=1e-6, atol=1e-6)


def grads(module, fn, *args):
    """Gradients of ``fn(module, *args)`` w.r.t. the module state and the args."""
    graphdef, state = nnx.split(module)
    return jax.grad(lambda s, *a: fn(nnx.merge(graphdef, s), *a), argnums=(0, 1))(state, *args)
