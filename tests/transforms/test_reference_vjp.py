"""vjp/jvp/custom_vjp, eval_shape, grad and control flow without graph updates (tree mode or
graph_updates=False): the arguments are pytrees, aliasing is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refax import nnx

MODES = [(True, False), (False, False)]


class Foo(nnx.Module):
    def __init__(self, x=1.0, y=2.0):
        self.x = nnx.Param(jnp.array(x))
        self.y = nnx.Param(jnp.array(y))
        self.n = nnx.BatchStat(jnp.array(0))
        self.z = 0


@pytest.mark.parametrize("graph,graph_updates", MODES)
def test_vjp_tree_mode_cotangents_shaped_like_args(graph, graph_updates):
    m = Foo(3.0, 4.0)

    def f(m, a):
        m.n[...] += 1
        return m.x * m.y * a

    out, vjp_fn = nnx.vjp(f, m, 2.0, graph=graph, graph_updates=graph_updates)
    np.testing.assert_allclose(out, 24.0)
    assert int(m.n[...]) == 1
    m_g, a_g = vjp_fn(jnp.array(1.0))
    assert isinstance(m_g, Foo)
    np.testing.assert_allclose(m_g.x[...], 8.0)
    np.testing.assert_allclose(m_g.y[...], 6.0)
    np.testing.assert_allclose(a_g, 12.0)
    assert m_g.n[...].dtype == jax.dtypes.float0


@pytest.mark.parametrize("graph,graph_updates", MODES)
def test_custom_vjp_tree_mode(graph, graph_updates):
    @nnx.custom_vjp(nondiff_argnums=(1,), graph=graph, graph_updates=graph_updates)
    def f(m, s):
        m.n[...] += 1
        m.z += 1  # a static attribute: not propagated without graph updates
        s[...] = s[...] + 5.0
        return jnp.sin(m.x) * m.y

    seen = {}

    def f_fwd(m, s):
        return f(m, s), (jnp.cos(m.x), m)

    def f_bwd(s, res, g, updates_g):
        cos_x, m = res
        seen["s"] = float(s[...])
        seen["upd"] = updates_g
        m_g = jax.tree.map(lambda x: x, m)
        m_g.x[...] = cos_x * g * m.y
        m_g.y[...] = jnp.sin(m.x) * g
        return (m_g,)

    f.defvjp(f_fwd, f_bwd)
    m, s = Foo(), nnx.BatchStat(jnp.array(1.0))
    grads = nnx.grad(lambda m, s: f(m, s), graph=graph, graph_updates=graph_updates)(m, s)
    assert isinstance(grads, Foo)
    np.testing.assert_allclose(grads.x[...], jnp.cos(1.0) * 2.0, rtol=1e-6)
    np.testing.assert_allclose(grads.y[...], jnp.sin(1.0), rtol=1e-6)
    assert int(m.n[...]) == 1 and float(s[...]) == 6.0 and m.z == 0
    assert seen["s"] == 1.0  # bwd sees the non-differentiated argument as it went in
    m_upd, s_upd = seen["upd"]
    assert m_upd.x is None and m_upd.y is None and isinstance(m_upd.n, nnx.BatchStat)
    assert isinstance(s_upd, nnx.BatchStat)


def test_custom_vjp_graph_updates_structure_change_and_returned_input():
    class Bar(nnx.Module):
        def __init__(self, x, y):
            self.x = nnx.Param(jnp.array(x))
            self.y = nnx.Param(jnp.array(y))
            self.z = 0

    @nnx.custom_vjp(graph=True, graph_updates=True)
    def f(m1, m2):
        m1.z += 1
        return jnp.sin(m1.x) * m1.y, m2

    def f_fwd(m1, m2):
        return f(m1, m2), (jnp.cos(m1.x), jnp.sin(m1.x), m1)

    def f_bwd(res, g):
        (m1_g, m2_g), (y_g, _) = g
        cos_x, sin_x, m = res
        return (
            nnx.State({"x": cos_x * y_g * m.y, "y": sin_x * y_g}),
            nnx.State({"x": m2_g["x"], "y": m2_g["y"]}),
        )

    f.defvjp(f_fwd, f_bwd)
    m1, m2 = Bar(1.0, 2.0), Bar(3.0, 4.0)

    def loss(m1, m2):
        y, m2 = f(m1, m2)
        return y + m2.x * m2.y

    g1, g2 = nnx.grad(loss, argnums=(0, 1))(m1, m2)
    np.testing.assert_allclose(g1["x"][...], jnp.cos(1.0) * 2.0, rtol=1e-6)
    np.testing.assert_allclose(g1["y"][...], jnp.sin(1.0), rtol=1e-6)
    np.testing.assert_allclose(g2["x"][...], 4.0)
    np.testing.assert_allclose(g2["y"][...], 3.0)
    assert m1.z == 1


def test_custom_vjp_errors_without_graph_updates():
    with pytest.raises(ValueError, match="`nondiff_argnums` cannot contain `DiffState`"):
        nnx.custom_vjp(lambda m: m, nondiff_argnums=(nnx.DiffState(0, ...),), graph=False)
    v = nnx.Param(jnp.array(1.0))

    @nnx.custom_vjp(nondiff_argnums=(1,), graph=True, graph_updates=False)
    def f(a, b):
        return a[...] + b[...]

    f.defvjp(lambda a, b: (f(a, b), ()), lambda b, res, g: (g,))
    with pytest.raises(ValueError, match="Duplicate"):
        f(v, v)
    np.testing.assert_allclose(f(v, nnx.Param(jnp.array(2.0))), 3.0)


@pytest.mark.parametrize("graph,graph_updates", MODES)
def test_eval_shape_aliasing(graph, graph_updates):
    v = nnx.Param(jnp.array(1.0))
    with pytest.raises(ValueError):
        nnx.eval_shape(lambda v: v, v, graph=graph, graph_updates=graph_updates)
    with pytest.raises(ValueError):
        nnx.eval_shape(lambda a, b: None, v, v, graph=graph, graph_updates=graph_updates)
    out = nnx.eval_shape(lambda v: v[...] * 2, v, graph=graph, graph_updates=graph_updates)
    assert out.shape == () and out.dtype == jnp.float32
    # graph mode with updates keeps sharing and returns abstract copies
    assert isinstance(nnx.eval_shape(lambda v: v, v), nnx.Param)


def test_eval_shape_hijax():
    with nnx.var_defaults(hijax=True):
        m = nnx.eval_shape(lambda: nnx.Linear(1, 2, rngs=nnx.Rngs(0)))
    assert isinstance(m.kernel.get_value(), jax.ShapeDtypeStruct)
    assert m.kernel.shape == (1, 2)


def test_grad_inconsistent_aliasing_without_updates():
    v = nnx.Param(jnp.array(3.0))
    with pytest.raises(ValueError, match="Inconsistent aliasing"):
        nnx.grad(lambda a, b: a[...] * b[...], graph=True, graph_updates=False)(v, v)
    # sharing inside one differentiated argument is fine
    g = nnx.grad(lambda t: t[0][...] * t[1][...], graph=True, graph_updates=False)((v, v))
    np.testing.assert_allclose(g[0][...], 6.0)


def test_cond_switch_tree_mode_sharing_and_no_graph_updates():
    v = nnx.Variable(jnp.array(0))
    m = nnx.Dict(a=v, b=v)

    def up(m):
        m.a[...] += 1

    def down(m):
        m.b[...] += 10

    with pytest.raises(ValueError):
        nnx.cond(True, up, down, m, graph=False)
    with pytest.raises(ValueError):
        nnx.switch(0, (up, down), m, graph=False)
    with pytest.raises(ValueError):
        nnx.fori_loop(0, 2, lambda i, m: m, m, graph=False)
    nnx.switch(1, (up, down), m, graph=True, graph_updates=False)
    assert int(m.a[...]) == 10 and m.a is m.b

    class C(nnx.Module):
        def __init__(self):
            self.n = nnx.Variable(jnp.array(0))
            self.k = 0

    c = C()

    def bump(c):
        c.n[...] += 2
        c.k = 1  # a static change: dropped without graph updates

    nnx.cond(True, bump, bump, c, graph=True, graph_updates=False)
    assert int(c.n[...]) == 2 and c.k == 0
