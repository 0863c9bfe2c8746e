"""nnx.grad / nnx.value_and_grad: argnums forms, DiffState filters, has_aux, gradient States,
state propagation of non-differentiated Variables, and parity with jax.grad and flax.nnx."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as F

from refax import nnx
from tests._oracle import assert_trees_close, pure

X = jax.random.normal(jax.random.key(1), (5, 3))
Y = jax.random.normal(jax.random.key(2), (5, 2))


def make_mlp(lib, bn=False):
    class MLP(lib.Module):
        def __init__(self, rngs):
            self.l1 = lib.Linear(3, 4, rngs=rngs)
            self.norm = lib.BatchNorm(4, rngs=rngs) if bn else lib.LayerNorm(4, rngs=rngs)
            self.l2 = lib.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(lib.relu(self.norm(self.l1(x))))

    return MLP(lib.Rngs(0))


def mse(m, x, y):
    return jnp.mean((m(x) - y) ** 2)


class W(nnx.Module):
    def __init__(self, v):
        self.w = nnx.Param(jnp.array(v))
        self.n = nnx.BatchStat(jnp.array(0.0))

    def __call__(self, x):
        self.n.value = self.n.value + 1
        return self.w * x


def vals(tree):
    """Gradient States to nested dicts of floats (other leaves to floats)."""
    is_state = lambda x: isinstance(x, nnx.State)
    return jax.tree.map(
        lambda s: jax.tree.map(float, nnx.to_pure_dict(s)) if is_state(s) else float(s),
        tree,
        is_leaf=is_state,
    )


# -- gradients as States ------------------------------------------------------------------
def test_grads_shaped_like_param_state():
    m = make_mlp(nnx)
    grads = nnx.grad(mse)(m, X, Y)
    params = nnx.state(m, nnx.Param)
    assert isinstance(grads, nnx.State)
    flat_g, flat_p = nnx.to_flat_state(grads), nnx.to_flat_state(params)
    assert [p for p, _ in flat_g] == [p for p, _ in flat_p]
    for (_, g), (_, p) in zip(flat_g, flat_p):
        assert type(g) is type(p) and g.value.shape == p.value.shape
        assert g is not p and g.value.dtype == p.value.dtype


def test_grads_match_functional_jax_grad_and_oracle():
    m = make_mlp(nnx)
    grads = nnx.grad(mse)(m, X, Y)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def functional(params):
        return mse(nnx.merge(graphdef, params, rest), X, Y)

    assert_trees_close(pure(nnx, grads), pure(nnx, jax.grad(functional)(params)))
    assert_trees_close(pure(nnx, grads), pure(F, F.grad(mse)(make_mlp(F), X, Y)))
    loss, grads2 = nnx.value_and_grad(mse)(m, X, Y)
    assert float(loss) == pytest.approx(float(functional(params)))
    assert_trees_close(pure(nnx, grads2), pure(nnx, grads))


# -- argnums ------------------------------------------------------------------------------
def test_argnums_int_tuple_and_negative():
    a = W(2.0)
    f = lambda x, m: m(x) ** 2
    assert vals(nnx.grad(f, argnums=1)(3.0, a)) == {"w": 36.0}
    assert vals(nnx.grad(f, argnums=-1)(3.0, a)) == {"w": 36.0}
    assert vals(nnx.grad(f, argnums=(0, 1))(3.0, a)) == (24.0, {"w": 36.0})
    assert vals(nnx.grad(f)(3.0, a)) == 24.0  # plain array argument only
    with pytest.raises(ValueError, match="argnums"):
        nnx.grad(f, argnums=2)(3.0, a)


def test_plain_arrays_mixed_with_objects():
    a, b = W(2.0), W(3.0)
    # objects and arrays nested in the same arguments
    assert vals(nnx.grad(lambda m, t: t[1] * m(t[0]), argnums=(0, 1))(a, [5.0, 2.0])) == (
        {"w": 10.0},
        [4.0, 10.0],
    )
    assert vals(nnx.grad(lambda t: t[0](t[1]))((a, 2.0))) == ({"w": 2.0}, 2.0)
    assert vals(nnx.grad(lambda x, t: t[1] * t[0](x), argnums=1)(3.0, [a, 2.0])) == [
        {"w": 6.0},
        6.0,
    ]
    d = vals(nnx.grad(lambda d: d["a"](1.0) * d["b"](2.0))({"a": a, "b": b}))
    assert d == {"a": {"w": 6.0}, "b": {"w": 4.0}}
    # array gradients equal jax.grad's for the same function of arrays
    x = jnp.arange(3.0)
    g_mod, g_x = nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x))), argnums=(0, 1))(a, x)
    np.testing.assert_allclose(g_x, jax.grad(lambda x: jnp.sum(jnp.sin(2.0 * x)))(x), rtol=1e-6)
    assert float(g_mod["w"].value) == pytest.approx(float(jnp.sum(jnp.cos(2.0 * x) * x)))


def test_variable_argument_and_module_list():
    a = W(2.0)
    g = nnx.grad(lambda v: v.value**2)(a.w)
    assert type(g) is nnx.Param and float(g.value) == 4.0
    gs = nnx.grad(lambda ms: sum(m(1.0) ** 2 for m in ms))([W(1.0), W(2.0)])
    assert vals(gs) == [{"w": 2.0}, {"w": 4.0}]


def test_shared_module_gets_gradient_once_like_oracle():
    for lib in (nnx, F):
        lin = lib.Linear(2, 2, rngs=lib.Rngs(0))
        g1, g2 = lib.grad(lambda a, b: jnp.sum(a(jnp.ones(2)) * b(jnp.ones(2))), argnums=(0, 1))(
            lin, lin
        )
        assert set(g1) == {"kernel", "bias"} and len(g2) == 0


# -- DiffState ----------------------------------------------------------------------------
def test_diffstate_filter_matches_oracle():
    f_path = lambda lib: lib.DiffState(0, lib.PathContains("l2"))
    g = nnx.grad(mse, argnums=f_path(nnx))(make_mlp(nnx), X, Y)
    fg = F.grad(mse, argnums=f_path(F))(make_mlp(F), X, Y)
    assert set(g) == {"l2"}
    assert_trees_close(pure(nnx, g), pure(F, fg))
    full = nnx.grad(mse)(make_mlp(nnx), X, Y)
    assert_trees_close(pure(nnx, g)["l2"], pure(nnx, full)["l2"])


def test_two_diffstates_on_different_arguments():
    a, b = W(2.0), W(3.0)
    argnums = (nnx.DiffState(0, nnx.Param), nnx.DiffState(1, nnx.BatchStat))
    ga, gb = nnx.grad(lambda m1, m2: m1(1.0) * m2(1.0), argnums=argnums)(a, b)
    assert vals(ga) == {"w": 3.0} and vals(gb) == {"n": 0.0}
    assert type(gb["n"]) is nnx.BatchStat


def test_lora_diffstate():
    x = jnp.ones((2, 3))
    grads = {}
    for lib in (nnx, F):
        m = lib.LoRALinear(3, 2, lora_rank=2, rngs=lib.Rngs(0), b_initializer=lib.initializers.ones)
        loss = lambda m: jnp.sum(m(x) ** 2)
        g = lib.grad(loss, argnums=lib.DiffState(0, lib.LoRAParam))(m)
        assert set(g) == {"lora"} and set(g["lora"]) == {"lora_a", "lora_b"}
        assert type(g["lora"]["lora_a"]) is lib.LoRAParam
        grads[lib] = pure(lib, g)
    assert_trees_close(grads[nnx], grads[F], rtol=1e-5)
    # the same numbers as jax.grad over the LoRA params alone
    m = nnx.LoRALinear(3, 2, lora_rank=2, rngs=nnx.Rngs(0), b_initializer=nnx.initializers.ones)
    graphdef, lora, rest = nnx.split(m, nnx.LoRAParam, ...)
    ref = jax.grad(lambda lo: jnp.sum(nnx.merge(graphdef, lo, rest)(x) ** 2))(lora)
    assert_trees_close(grads[nnx], pure(nnx, ref), rtol=1e-5)


# -- has_aux and forms --------------------------------------------------------------------
def test_has_aux_with_objects():
    a = W(2.0)

    def f(m, x):
        new = W(7.0)
        return m(x) ** 2, {"m": m, "new": new, "y": x * 3}

    (value, aux), grads = nnx.value_and_grad(f, has_aux=True)(a, 3.0)
    assert float(value) == 36.0 and vals(grads) == {"w": 36.0}
    assert aux["m"] is a and float(aux["y"]) == 9.0
    assert isinstance(aux["new"], W) and float(aux["new"].w.value) == 7.0
    grads2, aux2 = nnx.grad(f, has_aux=True)(a, 3.0)
    assert vals(grads2) == {"w": 36.0} and aux2["m"] is a
    with pytest.raises(ValueError, match="pair"):
        nnx.grad(lambda m: m(1.0), has_aux=True)(a)


def test_decorator_partial_and_method_forms():
    a = W(2.0)

    @nnx.grad
    def g(m, x):
        return m(x) ** 2

    assert vals(g(a, 3.0)) == {"w": 36.0}
    g2, aux = nnx.grad(argnums=1, has_aux=True)(lambda x, m: (m(x) ** 2, 7))(3.0, a)
    assert vals(g2) == {"w": 36.0} and aux == 7
    v, (gx, gm) = nnx.value_and_grad(argnums=(0, 1))(lambda x, m: m(x) ** 2)(3.0, a)
    assert float(v) == 36.0 and float(gx) == 24.0 and vals(gm) == {"w": 36.0}

    class K(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.array(2.0))

        @nnx.grad
        def gradme(self, x):
            return (self.w * x) ** 2

    assert vals(K().gradme(3.0)) == {"w": 36.0}
    with pytest.raises(ValueError, match="bound"):
        nnx.grad(a.__call__)


def test_allow_int_and_int_inputs():
    a = W(2.0)
    with pytest.raises(TypeError, match="allow_int"):
        nnx.grad(lambda m, i: m(1.0) * i, argnums=(0, 1))(a, 3)
    g, gi = nnx.grad(lambda m, i: m(1.0) * i, argnums=(0, 1), allow_int=True)(a, 3)
    assert vals(g) == {"w": 3.0} and gi.dtype == jax.dtypes.float0


def test_keyword_arguments_forwarded():
    a = W(2.0)
    assert vals(nnx.grad(lambda m, x=1.0: m(x) ** 2)(a, x=3.0)) == {"w": 36.0}


# -- state propagation --------------------------------------------------------------------
def test_non_differentiated_state_propagates():
    a = W(2.0)
    for i in range(1, 4):
        nnx.grad(lambda m: m(1.0))(a)
        assert float(a.n.value) == i
    nnx.value_and_grad(lambda m, x: m(x) + m(x))(a, 1.0)
    assert float(a.n.value) == 5.0
    assert float(a.w.value) == 2.0  # parameters are never changed by grad


def jit_value_and_grad_steps(lib, n=2):
    class Net(lib.Module):
        def __init__(self, rngs):
            self.l1 = lib.Linear(3, 8, rngs=rngs)
            self.bn = lib.BatchNorm(8, rngs=rngs)
            self.drop = lib.Dropout(0.3)
            self.l2 = lib.Linear(8, 2, rngs=rngs)

        def __call__(self, x, rngs):
            return self.l2(lib.gelu(self.drop(self.bn(self.l1(x)), rngs=rngs)))

    model, rngs = Net(lib.Rngs(0)), lib.Rngs(1)

    @lib.jit
    def step(model, x, y, rngs):
        return lib.value_and_grad(lambda m, r: jnp.mean((m(x, r) - y) ** 2))(model, rngs)

    out = [step(model, X + i, Y, rngs) for i in range(n)]
    losses = [float(loss) for loss, _ in out]
    return losses, [pure(lib, g) for _, g in out], pure(lib, model), pure(lib, rngs)


def test_batchnorm_and_dropout_through_jit_value_and_grad_match_oracle():
    """basics.md's pattern: nnx.jit over value_and_grad with an Rngs argument for Dropout."""
    (l_r, g_r, m_r, r_r), (l_f, g_f, m_f, r_f) = map(jit_value_and_grad_steps, (nnx, F))
    np.testing.assert_allclose(l_r, l_f, rtol=1e-6)
    for a, b in zip(g_r, g_f):
        assert_trees_close(a, b, rtol=1e-5, atol=1e-6)
    assert_trees_close(m_r, m_f, rtol=1e-5)
    assert_trees_close(r_r, r_f)
    assert int(r_r["default"]["count"]) == 2
    assert np.abs(m_r["bn"]["mean"]).sum() > 0 and not np.allclose(m_r["bn"]["var"], 1.0)
    assert set(g_r[0]) == {"l1", "bn", "l2"} and set(g_r[0]["bn"]) == {"scale", "bias"}
