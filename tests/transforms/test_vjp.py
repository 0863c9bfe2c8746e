"""Stateful vjp / jvp and custom_vjp: numerics against JAX and the oracle, state, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as fnnx

import refax as nnx
from refax._transforms._custom_vjp import custom_vjp
from refax._transforms._vjp import jvp, vjp


def _linear_pair():
    m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    fm = fnnx.Linear(2, 3, rngs=fnnx.Rngs(0))
    fm.kernel[...] = m.kernel.value
    fm.bias[...] = m.bias.value + 0.1
    m.bias.value = m.bias.value + 0.1
    return m, fm


def _pure_loss(kernel, bias, x):
    return jnp.sum(jnp.tanh(x @ kernel + bias))


X = jnp.array([[1.0, -2.0], [0.5, 3.0]])
loss = lambda m, x: jnp.sum(jnp.tanh(m(x)))


# -- vjp -------------------------------------------------------------------------------------
def test_vjp_matches_jax_and_oracle():
    m, fm = _linear_pair()
    out, vjp_fn = vjp(loss, m, X)
    m_g, x_g = vjp_fn(jnp.array(2.0))
    ref_out, ref_fn = jax.vjp(_pure_loss, m.kernel.value, m.bias.value, X)
    k_g, b_g, rx_g = ref_fn(jnp.array(2.0))
    np.testing.assert_allclose(out, ref_out, rtol=1e-6)
    assert isinstance(m_g, nnx.State) and set(m_g) == {"kernel", "bias"}
    assert isinstance(m_g["kernel"], nnx.Param)
    np.testing.assert_allclose(m_g["kernel"].value, k_g, rtol=1e-6)
    np.testing.assert_allclose(m_g["bias"].value, b_g, rtol=1e-6)
    np.testing.assert_allclose(x_g, rx_g, rtol=1e-6)
    # the oracle (tree mode: its cotangent for the module is a module)
    f_out, f_fn = fnnx.vjp(loss, fm, X, graph=False)
    fm_g, fx_g = f_fn(jnp.array(2.0))
    np.testing.assert_allclose(out, f_out, rtol=1e-6)
    np.testing.assert_allclose(m_g["kernel"].value, fm_g.kernel[...], rtol=1e-6)
    np.testing.assert_allclose(x_g, fx_g, rtol=1e-6)


def test_vjp_decorator_forms_and_pytree_primals():
    m, _ = _linear_pair()
    out1, fn1 = vjp(loss)(m, X)
    out2, fn2 = vjp(has_aux=False)(loss)(m, X)
    np.testing.assert_allclose(out1, out2)
    (ms,) = vjp(lambda ms: loss(ms[0], X) + loss(ms[1], X), [m, m])[1](1.0)
    assert isinstance(ms, list) and isinstance(ms[0], nnx.State)
    full = vjp(lambda m: 2 * loss(m, X), m)[1](1.0)[0]
    np.testing.assert_allclose(ms[0]["kernel"].value, full["kernel"].value, rtol=1e-6)


def test_vjp_has_aux_propagates_batchnorm_stats():
    bn, ref = nnx.BatchNorm(3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    x = jnp.arange(6.0).reshape(2, 3)
    out, vjp_fn, aux = vjp(lambda bn, x: (jnp.sum(bn(x) * x), bn), bn, x, has_aux=True)
    ref_y = ref(x)
    assert aux is bn
    np.testing.assert_allclose(bn.mean.value, ref.mean.value)
    np.testing.assert_allclose(out, jnp.sum(ref_y * x), rtol=1e-6)
    bn_g, _ = vjp_fn(jnp.array(1.0))
    assert set(bn_g) == {"scale", "bias"}  # batch stats are not differentiated
    np.testing.assert_allclose(bn_g["bias"].value, x.sum(0), rtol=1e-6)


def test_vjp_refuses_objects_in_primary_output():
    m, _ = _linear_pair()
    with pytest.raises(TypeError, match="has_aux=True"):
        vjp(lambda m: m, m)


# -- jvp -------------------------------------------------------------------------------------
def test_jvp_matches_jax_and_oracle():
    m, fm = _linear_pair()
    t_state = jax.tree.map(lambda v: jnp.full_like(v, 0.5), nnx.state(m, nnx.Param))
    t_x = jnp.ones_like(X)
    out, t_out = jvp(loss, (m, X), (t_state, t_x))
    k, b = m.kernel.value, m.bias.value
    ref_out, ref_t = jax.jvp(
        _pure_loss, (k, b, X), (jnp.full_like(k, 0.5), jnp.full_like(b, 0.5), t_x)
    )
    np.testing.assert_allclose(out, ref_out, rtol=1e-6)
    np.testing.assert_allclose(t_out, ref_t, rtol=1e-6)
    f_t = jax.tree.map(lambda v: jnp.full_like(v, 0.5), fm)
    f_out, f_tout = fnnx.jvp(loss, (fm, X), (f_t, t_x), graph=False)
    np.testing.assert_allclose(t_out, f_tout, rtol=1e-6)
    # an object of the same structure is accepted as the tangent, like the oracle's
    _, t_obj = jvp(loss, (m, X), (jax.tree.map(lambda v: jnp.full_like(v, 0.5), m), t_x))
    np.testing.assert_allclose(t_obj, t_out, rtol=1e-6)


def test_jvp_partial_and_none_tangents_are_zero():
    m, _ = _linear_pair()
    only_bias = nnx.State({"bias": nnx.Param(jnp.ones(3))})
    _, t1 = jvp(loss, (m, X), (only_bias, None))
    ref = jax.jvp(lambda b: _pure_loss(m.kernel.value, b, X), (m.bias.value,), (jnp.ones(3),))
    np.testing.assert_allclose(t1, ref[1], rtol=1e-6)
    with pytest.raises(ValueError, match="one tangent per primal"):
        jvp(loss, (m, X), (only_bias,))


def test_jvp_has_aux_and_state_updates():
    class Scale(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.array(3.0))
            self.calls = nnx.BatchStat(jnp.array(0))

    s = Scale()

    @jvp(has_aux=True)
    def f(s, x):
        s.calls += 1
        return s.w * x**2, s.calls

    out, t, calls = f((s, 2.0), (nnx.State({"w": nnx.Param(jnp.array(1.0))}), 1.0))
    assert float(out) == 12.0 and float(t) == 4.0 + 12.0
    assert int(calls) == 1 and int(s.calls.value) == 1


# -- custom_vjp ------------------------------------------------------------------------------
def _foo_and_f(lib, decorator):
    class Foo(lib.Module):
        def __init__(self, x, y):
            self.x = lib.Param(x)
            self.y = lib.Param(y)
            self.z = lib.BatchStat(jnp.array(0.0))

    @decorator
    def f(m, c):
        m.z[...] += 1.0
        return jnp.sin(m.x[...]) * m.y[...] * c

    def f_fwd(m, c):
        return f(m, c), (jnp.cos(m.x[...]), jnp.sin(m.x[...]), m, c)

    def f_bwd(res, g):
        input_updates_g, out_g = g
        cos_x, sin_x, m, c = res
        m_updates_g, c_updates_g = input_updates_g
        assert c_updates_g is None
        m_g = jax.tree.map(lambda x: x, m_updates_g)
        m_g["x"][...] = cos_x * out_g * m.y[...] * c
        m_g["y"][...] = sin_x * out_g * c
        return m_g, sin_x * m.y[...] * out_g

    f.defvjp(f_fwd, f_bwd)
    return Foo, f


def test_custom_vjp_matches_oracle_and_jax():
    Foo, f = _foo_and_f(nnx, custom_vjp)
    FFoo, ff = _foo_and_f(fnnx, fnnx.custom_vjp)
    m, fm = Foo(jnp.array(1.0), jnp.array(2.0)), FFoo(jnp.array(1.0), jnp.array(2.0))
    g_m, g_c = nnx.grad(f, argnums=(0, 1))(m, 3.0)
    f_m, f_c = fnnx.grad(ff, argnums=(0, 1))(fm, 3.0)
    r_x, r_y, r_c = jax.grad(lambda x, y, c: jnp.sin(x) * y * c, argnums=(0, 1, 2))(1.0, 2.0, 3.0)
    for ours, oracle, ref in [(g_m["x"], f_m["x"], r_x), (g_m["y"], f_m["y"], r_y)]:
        np.testing.assert_allclose(ours.value, oracle[...], rtol=1e-6)
        np.testing.assert_allclose(ours.value, ref, rtol=1e-6)
    np.testing.assert_allclose(g_c, f_c, rtol=1e-6)
    np.testing.assert_allclose(g_c, r_c, rtol=1e-6)
    assert float(m.z.value) == float(fm.z[...]) == 1.0  # the update inside f propagates
    np.testing.assert_allclose(f(m, 2.0), jnp.sin(1.0) * 4.0, rtol=1e-6)
    g_jit = nnx.jit(nnx.grad(f))(m, 3.0)
    np.testing.assert_allclose(g_jit["x"].value, r_x, rtol=1e-6)
    assert float(m.z.value) == 3.0


def test_custom_vjp_nondiff_ints_and_diffstate():
    class Foo(nnx.Module):
        def __init__(self):
            self.x = nnx.Param(jnp.array(1.0))
            self.y = nnx.Param(jnp.array(2.0))

    only_x = nnx.DiffState(0, nnx.PathContains("x"))
    seen = {}

    @custom_vjp(nondiff_argnums=(only_x, 2))
    def h(m, a, act):
        return act(m.x.value) * m.y.value * a

    def h_fwd(m, a, act):
        return h(m, a, act), (m, a)

    def h_bwd(act, res, g):
        (m_upd, a_upd), out_g = g
        m, a = res
        seen["keys"], seen["a_upd"] = set(m_upd), a_upd
        m_g = jax.tree.map(lambda v: v, m_upd)
        m_g["x"].value = jax.grad(act)(m.x.value) * m.y.value * a * out_g
        return m_g, act(m.x.value) * m.y.value * out_g

    h.defvjp(h_fwd, h_bwd)
    g_m, g_a = nnx.grad(h, argnums=(only_x, 1))(Foo(), 3.0, jnp.sin)
    # input_updates_g holds every Variable of the object (only x is differentiable)
    assert seen == {"keys": {"x", "y"}, "a_upd": None}
    assert set(g_m) == {"x"}
    r_x, r_a = jax.grad(lambda x, a: jnp.sin(x) * 2.0 * a, argnums=(0, 1))(1.0, 3.0)
    np.testing.assert_allclose(g_m["x"].value, r_x, rtol=1e-6)
    np.testing.assert_allclose(g_a, r_a, rtol=1e-6)
    # y is not differentiable through h: plain grad gets a zero for it
    g_all = nnx.grad(h)(Foo(), 3.0, jnp.sin)
    assert float(g_all["y"].value) == 0.0


def test_custom_vjp_cotangent_of_values_written_inside():
    class P(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.array(0.5))

    @custom_vjp
    def double(m):  # writes w <- 2w and returns sin(w_new)
        m.w.value = 2 * m.w.value
        return jnp.sin(m.w.value)

    def fwd(m):
        w0 = m.w.value
        return double(m), w0

    def bwd(w0, g):
        (m_upd,), out_g = g
        m_g = jax.tree.map(lambda v: v, m_upd)  # holds the cotangent of the new w
        m_g["w"].value = 2 * (jnp.cos(2 * w0) * out_g + m_upd["w"].value)
        return (m_g,)

    double.defvjp(fwd, bwd)

    def loss(m):
        return double(m) + 3 * m.w.value  # uses the value written inside

    g = nnx.grad(loss)(P())
    ref = jax.grad(lambda w: jnp.sin(2 * w) + 3 * 2 * w)(0.5)
    np.testing.assert_allclose(g["w"].value, ref, rtol=1e-6)


def test_custom_vjp_simple_convention_with_graph_updates_false():
    class Foo(nnx.Module):
        def __init__(self):
            self.x = nnx.Param(jnp.array(1.5))
            self.y = nnx.Param(jnp.array(2.0))

    @custom_vjp(graph_updates=False)
    def k(m):
        return m.x.value * m.y.value

    def k_bwd(m, g, *, updates_g):
        # shaped like the argument; None for the Variables the call did not update
        assert isinstance(updates_g[0], Foo) and updates_g[0].x is None
        m_g = nnx.clone(m)  # an object-shaped cotangent is accepted too
        m_g.x.value, m_g.y.value = g * m.y.value, g * m.x.value
        return (m_g,)

    k.defvjp(lambda m: (k(m), m), k_bwd)
    g = nnx.grad(k)(Foo())
    assert (float(g["x"].value), float(g["y"].value)) == (2.0, 1.5)


def test_custom_vjp_errors():
    class Foo(nnx.Module):
        def __init__(self):
            self.x = nnx.Param(jnp.array(1.0))

    f = custom_vjp(lambda m: m.x.value)
    with pytest.raises(AttributeError, match="defvjp"):
        f(Foo())
    f.defvjp(lambda m: (f(m), None), lambda res, g: ())
    with pytest.raises(ValueError, match="one cotangent per differentiated argument"):
        nnx.grad(f)(Foo())
    g = custom_vjp(lambda m, s: m.x.value * s, nondiff_argnums=(0,))
    g.defvjp(lambda m, s: (g(m, s), None), lambda m, res, ct: (ct,))
    with pytest.raises(ValueError, match="integers cannot mark objects"):
        g(Foo(), 2.0)
    # graph structure changes propagate in graph mode with graph updates
    grow = custom_vjp(lambda m: setattr(m, "y", nnx.Param(m.x.value * 2)) or m.x.value)
    grow.defvjp(lambda m: (grow(m), None), lambda res, ct: (None,))
    m = Foo()
    grow(m)
    assert float(m.y.value) == 2.0
