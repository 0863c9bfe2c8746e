"""nnx.pmap and nnx.shard_map on 8 (simulated CPU) devices: state propagation, StateAxes /
StateSharding prefixes, per-shard blocks, objects created inside, and the oracle flax.nnx.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; without 8 devices the
multi-device tests skip.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import refax as nnx
from refax._transforms._pmap import pmap
from refax._transforms._shard_map import shard_map

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)


class Count(nnx.Variable):
    pass


class Stack(nnx.Module):
    def __init__(self, n=8, count=None):
        self.w = nnx.Param(jnp.arange(n * 3.0).reshape(n, 3))
        self.count = Count(jnp.zeros((n,), jnp.int32) if count is None else count)


# -- pmap ------------------------------------------------------------------------------------
def test_pmap_state_propagation_and_collectives():
    m = Stack()
    traces = []

    @pmap(axis_name="d")
    def step(m, x):
        traces.append(1)
        m.count += 1
        return jax.lax.psum(x * m.w, "d")

    for _ in range(3):
        y = step(m, jnp.ones((8, 3)))
    np.testing.assert_array_equal(m.count[...], 3 * np.ones(8))
    np.testing.assert_allclose(y, np.broadcast_to(m.w[...].sum(0), (8, 3)))
    assert len(traces) <= 2  # compiled once per input placement, then cached


def test_pmap_state_axes_broadcast_count():
    m = Stack(count=jnp.array(0))
    axes = nnx.StateAxes({nnx.Param: 0, Count: None})

    @pmap(in_axes=(axes, 0), out_axes=1)
    def f(m, x):
        m.count += 1
        return x * m.w

    y = f(m, jnp.ones((8, 3)))
    assert y.shape == (3, 8)
    np.testing.assert_allclose(y, m.w[...].T)
    assert m.count[...].shape == () and int(m.count[...]) == 1


def test_pmap_objects_created_inside():
    lin = pmap(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0)), axis_size=8)()
    assert lin.kernel.shape == (8, 2, 3)
    np.testing.assert_allclose(lin.kernel[...][0], lin.kernel[...][7])
    keys = jax.random.split(jax.random.key(0), 4)
    lin = pmap(lambda k: nnx.Linear(2, 3, rngs=nnx.Rngs(params=k)), out_axes=1)(keys)
    assert lin.kernel.shape == (2, 4, 3)
    ref = nnx.vmap(lambda k: nnx.Linear(2, 3, rngs=nnx.Rngs(params=k)), out_axes=1)(keys)
    np.testing.assert_allclose(lin.kernel[...], ref.kernel[...])


def test_pmap_graph_updates_and_identity():
    m = Stack()

    def f(m):
        m.extra = nnx.Param(m.w.sum())
        del m.count
        return m

    out = pmap(f)(m)
    assert out is m and not hasattr(m, "count")
    np.testing.assert_allclose(m.extra[...], m.w[...].sum(1))


def test_pmap_static_and_donated_arguments():
    m = Stack()

    @pmap(static_broadcasted_argnums=0, donate_argnums=1)
    def f(scale, m, x):
        m.count += scale
        return x * scale

    y = f(3, m, jnp.ones(8))
    np.testing.assert_allclose(y, 3 * np.ones(8))
    np.testing.assert_array_equal(m.count[...], 3 * np.ones(8))
    with pytest.raises(ValueError, match="global_arg_shapes"):
        pmap(lambda x: x, global_arg_shapes=((1,),))
    with pytest.raises(ValueError, match="mapped axis, or axis_size"):
        pmap(lambda m: None, in_axes=None)(m)


def test_pmap_matches_oracle():
    fnnx = pytest.importorskip("flax.nnx")

    def run(lib, transform):
        class Block(lib.Module):
            def __init__(self, rngs):
                self.lin = lib.Linear(3, 3, rngs=rngs)
                self.bn = lib.BatchNorm(3, rngs=rngs)

            def __call__(self, x):
                return self.bn(self.lin(x))

        keys = jax.random.split(jax.random.key(1), 8)
        model = transform(lambda k: Block(lib.Rngs(params=k)))(keys)
        x = jnp.linspace(-1, 1, 8 * 4 * 3).reshape(8, 4, 3)
        y = transform(lambda m, x: m(x))(model, x)
        return np.asarray(y), np.asarray(model.bn.mean[...])

    (y, mean), (ref_y, ref_mean) = run(nnx, pmap), run(fnnx, fnnx.pmap)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)


# -- shard_map -------------------------------------------------------------------------------
def _mesh():
    return Mesh(np.array(jax.devices()[:8]), ("x",))


def _model(lib):
    class Model(lib.Module):
        def __init__(self, rngs):
            self.lin = lib.Linear(4, 16, rngs=rngs)
            self.count = Count(jnp.array(0)) if lib is nnx else lib.Variable(jnp.array(0))

    return Model(lib.Rngs(0))


def _specs(lib):
    return lib.StateSharding(
        {
            lib.PathContains("kernel"): P(None, "x"),
            lib.PathContains("bias"): P("x"),
            ...: P(),
        }
    )


def _forward(m, x):
    m.count[...] += 1
    m.lin.bias[...] += 1.0
    return x @ m.lin.kernel[...] + m.lin.bias[...]


def test_shard_map_per_shard_blocks_and_updates_propagate():
    m = _model(nnx)
    seen = {}

    @shard_map(mesh=_mesh(), in_specs=(_specs(nnx), P()), out_specs=P(None, "x"))
    def f(m, x):
        seen["kernel"], seen["bias"], seen["count"] = m.lin.kernel.shape, m.lin.bias.shape, ()
        return _forward(m, x)

    x = jnp.ones((2, 4))
    kernel = m.lin.kernel[...]
    y = f(m, x)
    assert seen == {"kernel": (4, 2), "bias": (2,), "count": ()}
    np.testing.assert_allclose(y, x @ kernel + 1.0, rtol=1e-6)
    assert int(m.count[...]) == 1
    np.testing.assert_allclose(m.lin.bias[...], np.ones(16))
    assert m.lin.bias[...].sharding.spec == P("x")


def test_shard_map_matches_oracle():
    fnnx = pytest.importorskip("flax.nnx")
    x = jnp.linspace(-1, 1, 8).reshape(2, 4)
    results = []
    for lib, transform in ((nnx, shard_map), (fnnx, fnnx.shard_map)):
        m = _model(lib)
        f = transform(_forward, mesh=_mesh(), in_specs=(_specs(lib), P()), out_specs=P(None, "x"))
        y = f(m, x)
        y = f(m, y[:, :4])
        results.append((np.asarray(y), np.asarray(m.lin.bias[...]), int(m.count[...])))
    (y1, b1, c1), (y2, b2, c2) = results
    np.testing.assert_allclose(y1, y2, rtol=1e-6)
    np.testing.assert_allclose(b1, b2)
    assert c1 == c2 == 2


def test_shard_map_objects_created_inside_are_assembled():
    @shard_map(mesh=_mesh(), in_specs=P("x"), out_specs=P("x"))
    def make(x):
        return nnx.Linear(4, 3, rngs=nnx.Rngs(0)), x * 2

    lin, y = make(jnp.arange(8.0))
    assert lin.kernel.shape == (32, 3) and lin.bias.shape == (24,)
    np.testing.assert_allclose(lin.kernel[...][:4], lin.kernel[...][28:])
    np.testing.assert_allclose(y, jnp.arange(8.0) * 2)


def test_shard_map_collectives_graph_updates_and_jit():
    m = Stack()

    @nnx.jit
    @shard_map(mesh=_mesh(), in_specs=P("x"), out_specs=P())
    def total(m):
        m.count += jax.lax.axis_index("x")
        m.mean = nnx.Param(m.w[...].mean(1))  # a new per-shard Variable (spec P("x"))
        return jax.lax.psum(m.w[...].sum(), "x")

    s = total(m)
    np.testing.assert_allclose(s, m.w[...].sum())
    np.testing.assert_array_equal(m.count[...], np.arange(8))
    np.testing.assert_allclose(m.mean[...], m.w[...].mean(1))


def test_shard_map_grad_through():
    m = _model(nnx)
    f = shard_map(
        lambda m, x: x @ m.lin.kernel[...],
        mesh=_mesh(),
        in_specs=(_specs(nnx), P()),
        out_specs=P(None, "x"),
    )
    grads = nnx.grad(lambda m, x: jnp.sum(f(m, x) ** 2))(m, jnp.ones((2, 4)))
    expected = jax.grad(lambda k: jnp.sum((jnp.ones((2, 4)) @ k) ** 2))(m.lin.kernel[...])
    np.testing.assert_allclose(grads["lin"]["kernel"][...], expected, rtol=1e-5)


def test_shard_map_errors():
    m = _model(nnx)
    mesh = _mesh()
    with pytest.raises(ValueError, match="Inconsistent aliasing"):
        shard_map(lambda a, b: None, mesh=mesh, in_specs=(P("x"), P()), out_specs=P())(m, m)
    with pytest.raises(ValueError, match="in_specs has 1 entries"):
        shard_map(lambda a, b: None, mesh=mesh, in_specs=(P(),), out_specs=P())(m, m)
    with pytest.raises(TypeError, match="positionally"):
        shard_map(lambda m: None, mesh=mesh, in_specs=P(), out_specs=P())(m=m)
    with pytest.raises(ValueError, match="PartitionSpec, None or nnx.StateSharding"):
        shard_map(lambda m: None, mesh=mesh, in_specs=(nnx.StateAxes({...: 0}),), out_specs=P())(m)
