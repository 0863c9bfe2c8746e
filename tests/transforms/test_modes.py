"""graph= / graph_updates= and the process-wide defaults (set_graph_mode / set_graph_updates)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refax import nnx


class M(nnx.Module):
    def __init__(self):
        self.a = nnx.Param(jnp.ones(2))
        self.count = nnx.Variable(jnp.array(0))


def shared() -> M:
    m = M()
    m.b = m.a  # one Param reachable by two paths
    return m


def loss(m: M) -> jnp.ndarray:
    return (m.a.value**2).sum()


TRANSFORMS = {
    "jit": lambda f, **kw: nnx.jit(f, **kw),
    "grad": lambda f, **kw: nnx.grad(f, **kw),
    "vmap": lambda f, **kw: nnx.vmap(f, in_axes=None, axis_size=2, **kw),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_tree_mode_rejects_shared_references(name):
    with pytest.raises(ValueError, match="Shared reference found in tree mode"):
        with nnx.set_graph_mode(False):
            TRANSFORMS[name](loss)(shared())
    # graph mode (the default) accepts the sharing
    assert nnx.set_graph_mode.current_value() is True
    TRANSFORMS[name](loss)(shared())


def test_explicit_graph_false_on_jit():
    with pytest.raises(ValueError, match="tree mode"):
        nnx.jit(loss, graph=False)(shared())


def test_graph_updates_false_keeps_structure_but_propagates_values():
    m = M()

    @nnx.jit(graph_updates=False)
    def step(m):
        m.count[...] += 1
        m.extra = nnx.Param(jnp.zeros(1))  # a structural change: not propagated

    step(m)
    step(m)
    assert int(m.count.value) == 2 and not hasattr(m, "extra")


def test_set_graph_updates_default_and_context():
    m = M()

    @nnx.jit
    def step(m):
        m.extra = nnx.Param(jnp.zeros(1))

    with nnx.set_graph_updates(False):
        assert nnx.set_graph_updates.current_value() is False
        step(m)
    assert not hasattr(m, "extra")
    step(m)  # default: graph updates propagate
    np.testing.assert_array_equal(m.extra.value, [0.0])


def test_grad_with_graph_updates_false_propagates_values_only():
    m = M()

    def loss_with_side_effects(m):
        m.count[...] += 1
        m.extra = nnx.Param(jnp.zeros(1))
        return loss(m)

    grads = nnx.grad(loss_with_side_effects, graph_updates=False)(m)
    # without graph updates the gradients are shaped like the argument (jax.grad on a pytree)
    assert type(grads) is M and grads.a is not m.a
    np.testing.assert_allclose(grads.a.value, 2 * np.ones(2))
    assert grads.count.value.dtype == jax.dtypes.float0  # integer state: not differentiated
    assert int(m.count.value) == 1 and not hasattr(m, "extra")
    nnx.grad(loss_with_side_effects)(m)
    assert int(m.count.value) == 2 and hasattr(m, "extra")


def test_vmap_with_graph_updates_false_propagates_values_only():
    m = M()

    def step(m):
        m.count[...] += 1
        m.extra = nnx.Param(jnp.zeros(1))

    nnx.vmap(step, in_axes=None, axis_size=2, graph_updates=False)(m)
    assert int(m.count.value) == 1 and not hasattr(m, "extra")
    nnx.vmap(step, in_axes=None, axis_size=2)(m)
    assert int(m.count.value) == 2 and hasattr(m, "extra")
