"""The lifting core every transform shares (refax/_transforms/_lift.py): one inner step, the
modes resolved once per call, and what crosses the JAX boundary (raw-array attributes,
jax.Refs). Each behaviour is checked through several transforms, since they share the code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refax import nnx


class Box(nnx.Pytree):
    def __init__(self, data):
        self.data = data  # a raw array, not a Variable


class M(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones(2))


def shared() -> M:
    m = M()
    m.v = m.w  # one Param reachable by two paths
    return m


def grow(m):
    m.w[...] = m.w[...] * 2
    m.extra = nnx.Param(jnp.zeros(1))  # a structural change
    return m.w[...].sum()


# every transform that runs its function once on the arguments, as a call f(m) -> out
RUN_ONCE = {
    "jit": lambda f, **kw: nnx.jit(f, **kw),
    "remat": lambda f, **kw: nnx.remat(f, **kw),
    "checkify": lambda f, **kw: lambda *a: nnx.checkify(f, **kw)(*a)[1],
    "cond": lambda f, **kw: lambda m: nnx.cond(True, f, f, m, **kw),
    "pmap": lambda f, **kw: lambda m: nnx.pmap(f, in_axes=None, axis_size=1, **kw)(m)[0],
}


@pytest.mark.parametrize("name", list(RUN_ONCE))
def test_graph_updates_false_propagates_values_not_structure(name):
    m = M()
    out = RUN_ONCE[name](grow, graph_updates=False)(m)
    np.testing.assert_allclose(out, 4.0)
    np.testing.assert_allclose(m.w[...], [2.0, 2.0])
    assert not hasattr(m, "extra")


@pytest.mark.parametrize("name", list(RUN_ONCE))
def test_graph_updates_true_propagates_structure(name):
    m = M()
    RUN_ONCE[name](grow, graph_updates=True)(m)
    np.testing.assert_allclose(m.w[...], [2.0, 2.0])
    assert isinstance(m.extra, nnx.Param)


@pytest.mark.parametrize("name", list(RUN_ONCE))
def test_tree_mode_refuses_shared_references(name):
    with pytest.raises(ValueError, match="Shared reference found in tree mode"):
        RUN_ONCE[name](lambda m: m.w[...].sum(), graph=False)(shared())
    RUN_ONCE[name](lambda m: m.w[...].sum(), graph=True)(shared())  # graph mode keeps it


@pytest.mark.parametrize("updates", [True, False])
def test_raw_array_attribute_rebound_inside_comes_back(updates):
    # a raw array is a value: rebinding it inside propagates in both modes
    def bump(box):
        box.data = box.data + 1
        return box

    box = Box(jnp.array(0.0))
    assert nnx.jit(bump, graph_updates=updates)(box) is box
    np.testing.assert_allclose(box.data, 1.0)
    out = nnx.scan(bump, in_axes=nnx.Carry, out_axes=nnx.Carry, length=4, graph_updates=updates)(
        box
    )
    assert out is box
    np.testing.assert_allclose(box.data, 5.0)


def test_raw_array_with_structural_change_without_updates_keeps_the_input():
    def change(box):
        box.data = box.data + 1
        box.more = jnp.zeros(1)  # structure changed: nothing but Variables' values propagate
        return box.data

    box = Box(jnp.array(0.0))
    np.testing.assert_allclose(nnx.jit(change, graph_updates=False)(box), 1.0)
    np.testing.assert_allclose(box.data, 0.0)
    assert not hasattr(box, "more")


def test_refs_returned_from_jit():
    ref = jax.new_ref(jnp.array(1.0))

    @nnx.jit
    def f(r):
        r[...] += 1.0
        return jax.new_ref(jnp.array(10.0)), r, r[...] * 3

    new, same, tripled = f(ref)
    assert same is ref  # the caller's reference, updated in place
    np.testing.assert_allclose(ref[...], 2.0)
    assert isinstance(new, jax.Ref)
    np.testing.assert_allclose(new[...], 10.0)
    np.testing.assert_allclose(tripled, 6.0)
    new2, same2, _ = f(ref)  # the cached trace gives the same kinds of outputs
    assert same2 is ref and isinstance(new2, jax.Ref) and new2 is not new
    np.testing.assert_allclose(ref[...], 3.0)


@pytest.mark.parametrize("graph,updates", [(True, True), (True, False), (False, False)])
def test_loops_refuse_a_replaced_variable_in_every_mode(graph, updates):
    def body(carry):
        m, c = carry
        m.w = nnx.Param(jnp.zeros(2))  # the carry's structure must not change
        return m, c - 1

    with pytest.raises(ValueError):
        nnx.while_loop(lambda c: c[1] > 0, body, (M(), 2), graph=graph, graph_updates=updates)
    with pytest.raises(ValueError):
        nnx.fori_loop(0, 2, lambda i, c: body(c), (M(), 2), graph=graph, graph_updates=updates)
