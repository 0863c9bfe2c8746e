"""Sharded initialisation through nnx.jit out_shardings, and donation warnings."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from refax import nnx

needs_8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")


def create() -> nnx.Linear:
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
    return nnx.Linear(8, 16, kernel_init=init, rngs=nnx.Rngs(0))


@needs_8
def test_out_shardings_state_of_named_shardings_places_a_new_model():
    mesh = jax.make_mesh((8,), ("model",))
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(create)
        shardings = nnx.get_named_sharding(nnx.state(abstract), mesh)
        model = nnx.jit(create, out_shardings=shardings)()
    kernel = model.kernel.value
    assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2)
    assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (8, 2)
    np.testing.assert_allclose(kernel, create().kernel.value, rtol=1e-6)


@needs_8
def test_out_shardings_state_sharding_prefix():
    mesh = jax.make_mesh((8,), ("model",))
    spec = nnx.StateSharding({nnx.Param: NamedSharding(mesh, P("model"))})
    with jax.set_mesh(mesh):
        model = nnx.jit(create, out_shardings=spec)()
    assert model.bias.value.sharding.is_equivalent_to(NamedSharding(mesh, P("model")), 1)


def test_undonatable_buffer_warning_names_the_variable():
    class M(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((3, 4)))
            self.frozen = nnx.Variable(jnp.ones((5,)))

    m = M()

    @nnx.jit(donate_argnums=0)
    def step(m):
        m.w[...] = m.w * 2
        # frozen changes shape: no output can reuse its float32[5] buffer
        m.frozen.value = jnp.concatenate([m.frozen.value, m.frozen.value])
        return m.frozen.value.sum()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(m)
    messages = [str(w.message) for w in caught]
    assert any("Variable 'frozen' (float32[5])" in msg for msg in messages), messages
    np.testing.assert_array_equal(m.w.value, 2 * np.ones((3, 4)))
    assert m.frozen.value.shape == (10,) and not m.frozen.value.is_deleted()
