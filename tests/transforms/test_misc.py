"""Lifted remat, eval_shape, checkify, make_jaxpr, cached_partial and jit_partial."""

import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify as checkify_lib

import refax as nnx
from refax._transforms._checkify import checkify
from refax._transforms._eval_shape import eval_shape, make_jaxpr
from refax._transforms._jit import cached_partial, jit_partial
from refax._transforms._remat import checkpoint, remat


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 4, rngs=rngs)
        self.l2 = nnx.Linear(4, 2, rngs=rngs)
        self.calls = nnx.BatchStat(jnp.array(0))

    def __call__(self, x):
        self.calls += 1
        return self.l2(jnp.tanh(self.l1(x)))


def _loss(fwd):
    return lambda m, x: jnp.sum(fwd(m, x) ** 2)


# -- remat -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "wrap",
    [
        lambda f: f,
        remat,
        remat(prevent_cse=False),
        lambda f: checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable),
    ],
)
def test_remat_same_values_and_gradients(wrap):
    x = jnp.linspace(-1, 1, 6).reshape(2, 3)
    m = MLP(nnx.Rngs(0))
    ref = MLP(nnx.Rngs(0))
    fwd = wrap(lambda m, x: m(x))
    loss, grads = nnx.value_and_grad(_loss(fwd))(m, x)
    ref_loss, ref_grads = nnx.value_and_grad(_loss(lambda m, x: m(x)))(ref, x)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert int(m.calls.value) == 1  # the update made inside remat propagates


def test_remat_really_checkpoints():
    f = remat(lambda m, x: jnp.sin(m(x)).sum())
    m = MLP(nnx.Rngs(0))
    jaxpr = jax.make_jaxpr(nnx.grad(f))(m, jnp.ones((1, 3)))
    assert "checkpoint" in str(jaxpr) or "remat" in str(jaxpr)


def test_remat_on_method_and_static_argnums():
    class Block(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.array(2.0))

        @remat(static_argnums=(2,))
        def __call__(self, x, power):
            assert isinstance(power, int)  # stays a Python value
            return self.w * x**power

    b = Block()
    assert float(b(3.0, 2)) == 18.0
    g = nnx.grad(lambda b, x: b(x, 3))(b, 2.0)
    assert float(g["w"].value) == 8.0


def test_remat_returns_input_objects_by_identity():
    m = MLP(nnx.Rngs(0))
    out, y = remat(lambda m, x: (m, m(x)))(m, jnp.ones((1, 3)))
    assert out is m and y.shape == (1, 2)


# -- eval_shape ------------------------------------------------------------------------------
def test_eval_shape_builds_a_huge_linear_without_computing():
    start = time.perf_counter()
    lin = eval_shape(lambda: nnx.Linear(10_000, 10_000, rngs=nnx.Rngs(0)))
    assert time.perf_counter() - start < 2.0  # materialising 400 MB would take far longer
    assert isinstance(lin, nnx.Linear)
    assert isinstance(lin.kernel, nnx.Param)
    assert lin.kernel.value == jax.ShapeDtypeStruct((10_000, 10_000), jnp.float32)
    assert lin.bias.value == jax.ShapeDtypeStruct((10_000,), jnp.float32)
    assert lin.in_features == 10_000


def test_eval_shape_with_object_args_leaves_them_untouched():
    m = MLP(nnx.Rngs(0))
    kernel = m.l1.kernel.value
    out = eval_shape(lambda m, x: (m, m(x)), m, jnp.ones((5, 3)))
    abstract, y = out
    assert y == jax.ShapeDtypeStruct((5, 2), jnp.float32)
    assert abstract is not m and isinstance(abstract, MLP)
    assert abstract.l1.kernel.value == jax.ShapeDtypeStruct((3, 4), jnp.float32)
    assert int(m.calls.value) == 0 and m.l1.kernel.value is kernel
    assert isinstance(abstract.l2, nnx.Linear)


def test_eval_shape_kwargs_and_pure_function_matches_jax():
    f = lambda x, *, y: jnp.outer(x, y)
    x, y = jnp.ones(3), jnp.ones(4, jnp.int32)
    assert eval_shape(f, x, y=y) == jax.eval_shape(f, x, y=y)


def test_jit_eval_shape_method():
    m = MLP(nnx.Rngs(0))
    out = nnx.jit(lambda m, x: m(x)).eval_shape(m, jnp.ones((7, 3)))
    assert out.shape == (7, 2)


# -- checkify --------------------------------------------------------------------------------
def _checked_log(v):
    checkify_lib.check(jnp.all(v.value > 0), "v must be positive")
    v.value = jnp.log(v.value)
    return v


def test_checkify_catches_failed_check():
    v = nnx.Param(jnp.array([1.0, -1.0]))
    err, out = checkify(_checked_log)(v)
    assert err.get() is not None and "v must be positive" in err.get()
    with pytest.raises(checkify_lib.JaxRuntimeError, match="v must be positive"):
        err.throw()
    assert out is v


def test_checkify_passes_and_propagates_state():
    v = nnx.Param(jnp.array([1.0, jnp.e]))
    err, out = checkify(_checked_log)(v)
    assert err.get() is None and out is v
    np.testing.assert_allclose(v.value, [0.0, 1.0], atol=1e-6)


def test_checkify_float_checks_around_jit():
    class Foo(nnx.Module):
        def __init__(self, a):
            self.a = nnx.Param(a)

    f = nnx.jit(lambda m: m.a + jnp.sin(m.a))
    err, _ = checkify(f, errors=checkify_lib.float_checks)(Foo(jnp.array(jnp.inf)))
    assert "nan generated by primitive: sin" in err.get()


# -- make_jaxpr ------------------------------------------------------------------------------
def test_make_jaxpr_returns_closed_jaxpr():
    m = MLP(nnx.Rngs(0))
    jaxpr = make_jaxpr(lambda m, x: m(x))(m, jnp.ones((1, 3)))
    assert isinstance(jaxpr, jax.extend.core.ClosedJaxpr)
    assert "tanh" in str(jaxpr) and "dot_general" in str(jaxpr)
    assert int(m.calls.value) == 0  # nothing ran


def test_make_jaxpr_matches_jax_on_pure_function_and_return_shape():
    f = lambda x, y: jnp.sin(x) * y
    ours = make_jaxpr(f)(jnp.ones(3), 2.0)
    theirs = jax.make_jaxpr(f)(jnp.ones(3), 2.0)
    assert str(ours) == str(theirs)
    jaxpr, shape = make_jaxpr(lambda v, n: v.value * n, static_argnums=1, return_shape=True)(
        nnx.Param(jnp.ones((2, 2))), 3
    )
    assert "mul" in str(jaxpr)
    assert shape == jax.ShapeDtypeStruct((2, 2), jnp.float32)


def test_make_jaxpr_as_decorator_and_refuses_graph_updates():
    @make_jaxpr(static_argnums=(0,))
    def f(n, x):
        return x**n

    assert "integer_pow" in str(f(3, 1.0))
    with pytest.raises(ValueError, match="graph_updates=True"):
        make_jaxpr(lambda x: x, graph_updates=True)


# -- cached_partial / jit_partial -------------------------------------------------------------
def test_cached_partial_propagates_updates():
    m = MLP(nnx.Rngs(0))
    step = cached_partial(nnx.jit(lambda m, x: m(x)), m)
    for _ in range(3):
        y = step(jnp.ones((1, 3)))
    assert y.shape == (1, 2) and int(m.calls.value) == 3


def test_jit_partial_matches_jit():
    m, ref = MLP(nnx.Rngs(0)), MLP(nnx.Rngs(0))
    step = jit_partial(lambda m, x: m(x).sum(), m)
    x = jnp.arange(3.0).reshape(1, 3)
    np.testing.assert_allclose(step(x), nnx.jit(lambda m, x: m(x).sum())(ref, x))
    step(x)
    assert int(m.calls.value) == 2
