"""Lifted cond / switch / while_loop / fori_loop: state propagation, numerics, structure errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refax as nnx
from refax._transforms._control import cond, fori_loop, switch, while_loop
from refax.errors import TraceContextError, TransformStructureError


class Counter(nnx.Module):
    def __init__(self):
        self.count = nnx.BatchStat(jnp.array(0))
        self.total = nnx.BatchStat(jnp.array(0.0))


class Holder(nnx.Module):
    def __init__(self):
        self.a = nnx.Param(jnp.ones(2))


def up(c, x):
    c.count += 1
    c.total += x
    return c, x + 1


def down(c, x):
    c.count -= 1
    return c, x - 1


# -- cond / switch ---------------------------------------------------------------------------
@pytest.mark.parametrize("pred", [True, False])
def test_cond_propagates_state_and_keeps_identity(pred):
    c = Counter()
    out, y = cond(pred, up, down, c, 2.0)
    assert out is c
    assert int(c.count.value) == (1 if pred else -1)
    assert float(c.total.value) == (2.0 if pred else 0.0)
    assert float(y) == (3.0 if pred else 1.0)


def test_cond_matches_lax_cond_on_pure_function():
    f_true = lambda x, y: jnp.sin(x) * y
    f_false = lambda x, y: jnp.cos(x) + y
    x, y = jnp.linspace(0, 1, 5), jnp.arange(5.0)
    for pred in (True, False):
        np.testing.assert_allclose(
            cond(pred, f_true, f_false, x, y), jax.lax.cond(pred, f_true, f_false, x, y)
        )


def test_cond_traced_predicate_inside_jit():
    c = Counter()

    @nnx.jit
    def step(c, x):
        return cond(x > 0, up, down, c, x)[1]

    assert float(step(c, 1.0)) == 2.0
    assert float(step(c, -1.0)) == -2.0
    assert float(step(c, 3.0)) == 4.0
    assert int(c.count.value) == 1
    assert float(c.total.value) == 4.0


def test_cond_rngs_advance_in_one_branch():
    rngs = nnx.Rngs(0)
    draw = lambda r: jax.random.uniform(r())
    keep = lambda r: jnp.array(0.0)
    cond(True, draw, keep, rngs)
    cond(False, draw, keep, rngs)
    assert int(rngs.default.count.value) == 1


def test_switch_batchnorm_updates_like_direct_call():
    x = jnp.arange(6.0).reshape(2, 3)
    bn, ref = nnx.BatchNorm(3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    branches = [lambda m, x: m(x), lambda m, x: 2 * x, lambda m, x: -x]
    y = switch(0, branches, bn, x)
    np.testing.assert_allclose(y, ref(x), rtol=1e-6)
    np.testing.assert_allclose(bn.mean.value, ref.mean.value)
    np.testing.assert_allclose(bn.var.value, ref.var.value)
    np.testing.assert_allclose(switch(1, branches, bn, x), 2 * x)
    np.testing.assert_allclose(bn.mean.value, ref.mean.value)  # untouched by branch 1


def test_switch_matches_lax_switch_including_clamping():
    fs = [lambda x: x + 1, lambda x: x * 3, lambda x: -x]
    x = jnp.arange(3.0)
    for i in (-2, 0, 1, 2, 7):
        np.testing.assert_allclose(switch(i, fs, x), jax.lax.switch(i, fs, x))


def test_switch_objects_anywhere_in_operands():
    c1, c2 = Counter(), Counter()

    def bump(cs, k):
        cs["a"].count += k
        cs["b"][0].count += 2 * k
        return cs["b"][0]

    out = switch(1, [lambda cs, k: cs["b"][0], bump], {"a": c1, "b": [c2]}, 5)
    assert out is c2
    assert (int(c1.count.value), int(c2.count.value)) == (5, 10)


def test_cond_shared_module_in_operands():
    c = Counter()

    def both(a, b):
        a.count += 1
        b.count += 1

    cond(True, both, lambda a, b: None, c, c)
    assert int(c.count.value) == 2


def test_branches_adding_the_same_attribute_propagate():
    m = Holder()
    t = lambda m: setattr(m, "b", nnx.Param(m.a.value * 2))
    f = lambda m: setattr(m, "b", nnx.Param(m.a.value * 3))
    cond(jnp.array(False), t, f, m)
    np.testing.assert_allclose(m.b.value, [3.0, 3.0])


def test_branches_changing_structure_differently_raise():
    t = lambda m: setattr(m, "b", nnx.Param(m.a.value))
    f = lambda m: None
    with pytest.raises(TransformStructureError, match="changes the graph structure") as e:
        cond(True, t, f, Holder())
    assert isinstance(e.value, ValueError) and isinstance(e.value, TypeError)
    m = Holder()
    with pytest.raises(ValueError, match="branch 1 changes the graph structure"):
        switch(0, [f, t], m)
    assert not hasattr(m, "b")


def test_branches_with_different_outputs_raise():
    with pytest.raises(ValueError, match="different output structures"):
        cond(True, lambda x: (x, x), lambda x: x, 1.0)
    with pytest.raises(TypeError):  # same structure, different shapes: JAX's own error
        cond(True, lambda x: x, lambda x: jnp.stack([x, x]), 1.0)


def test_branch_mutating_closure_raises_trace_context_error():
    c = Counter()

    def bad(x):
        c.count += 1
        return x

    with pytest.raises(TraceContextError):
        cond(True, bad, lambda x: x, 1.0)


def test_bound_method_branch_is_refused():
    class M(nnx.Module):
        def __init__(self):
            self.n = nnx.BatchStat(jnp.array(0))

        def f(self):
            return 1.0

    m = M()
    with pytest.raises(ValueError, match="bound to a M"):
        cond(True, m.f, m.f)


# -- while_loop / fori_loop ------------------------------------------------------------------
def test_while_loop_rngs_keys_advance_like_eager():
    rngs = nnx.Rngs(0)

    def body(carry):
        r, i, s = carry
        return r, i + 1, s + jax.random.uniform(r())

    r, n, s = while_loop(lambda c: c[1] < 4, body, (rngs, 0, 0.0))
    eager = nnx.Rngs(0)
    expected = sum(float(jax.random.uniform(eager())) for _ in range(4))
    assert r is rngs and int(n) == 4
    assert int(rngs.default.count.value) == 4
    np.testing.assert_allclose(s, expected, rtol=1e-6)


def test_while_loop_module_counter_and_matches_lax():
    c = Counter()

    def body(carry):
        c, x = carry
        c.count += 1
        c.total += x
        return c, x * 2

    out, x = while_loop(lambda carry: carry[1] < 100.0, body, (c, 1.0))
    ref = jax.lax.while_loop(lambda x: x < 100.0, lambda x: x * 2, 1.0)
    assert out is c and float(x) == float(ref) == 128.0
    assert int(c.count.value) == 7 and float(c.total.value) == 127.0


def test_while_loop_cond_fun_must_not_update_state():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="cond_fun"):
        while_loop(lambda c: jax.random.uniform(c[0]()) < 2, lambda c: c, (rngs, 0))


@pytest.mark.parametrize("unroll", [None, 2, True])
def test_fori_loop_linear_like_documented_example(unroll):
    lin = nnx.Linear(3, 3, rngs=nnx.Rngs(0))

    def body(i, carry):
        m, x = carry
        m.kernel.value = jnp.eye(3) * i
        return m, m(x)

    x = jnp.arange(3.0)
    m, y = fori_loop(2, 4, body, (lin, x), unroll=unroll)
    assert m is lin
    np.testing.assert_allclose(y, x * 2 * 3)
    np.testing.assert_allclose(lin.kernel.value, jnp.eye(3) * 3)


def test_fori_loop_matches_lax_on_pure_function():
    body = lambda i, x: x * 0.5 + jnp.sin(i * x)
    x = jnp.linspace(-1, 1, 4)
    np.testing.assert_allclose(
        fori_loop(0, 5, body, x), jax.lax.fori_loop(0, 5, body, x), rtol=1e-6
    )


def test_fori_loop_batchnorm_in_carry_under_jit():
    bn, ref = nnx.BatchNorm(2, rngs=nnx.Rngs(0)), nnx.BatchNorm(2, rngs=nnx.Rngs(0))
    x = jnp.array([[0.0, 1.0], [2.0, 5.0]])

    @nnx.jit
    def run(bn, x):
        return fori_loop(0, 3, lambda i, c: (c[0], c[0](c[1])), (bn, x))[1]

    y = run(bn, x)
    for _ in range(3):
        x = ref(x)
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.mean.value, ref.mean.value, rtol=1e-5)


def test_fori_loop_dict_carry_with_shared_module():
    c = Counter()

    def body(i, carry):
        carry["a"].count += 1
        carry["b"].count += 1
        return carry

    out = fori_loop(0, 3, body, {"a": c, "b": c, "k": jnp.zeros(2)})
    assert out["a"] is c and out["b"] is c
    assert int(c.count.value) == 6


def test_loop_body_returning_new_object_raises():
    with pytest.raises(TransformStructureError, match=r"different object \(Holder\)"):
        fori_loop(0, 2, lambda i, c: (Holder(),), (Holder(),))


def test_loop_body_changing_structure_raises():
    def add_attr(i, carry):
        carry[0].b = nnx.Param(jnp.zeros(1))
        return carry

    m = Holder()
    with pytest.raises(TransformStructureError, match="changed the graph structure"):
        fori_loop(0, 2, add_attr, (m,))
    assert not hasattr(m, "b")
    with pytest.raises(TypeError, match="structure it received"):
        while_loop(lambda c: False, lambda c: (c[0], c[0]), (m,))


def test_loop_closure_mutation_raises_trace_context_error():
    c = Counter()

    def body(i, x):
        c.count += 1
        return x

    with pytest.raises(TraceContextError):
        fori_loop(0, 2, body, 0.0)
