"""Transform behaviour reference code relies on: hand lifting (split_inputs / merge_inputs),
transform_metadata, prefix checks, keyword binding, scan's stacked new objects and trace reuse,
and grads shaped like the argument without graph updates."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refax import nnx
from refax.nnx.transforms import general


class Counter(nnx.Module):
    def __init__(self):
        self.count = nnx.BatchStat(jnp.array(0))
        self.w = nnx.Param(jnp.ones(3))


def test_split_merge_inputs_around_jit_and_cond_propagate_updates():
    m = Counter()

    @general.split_inputs
    @jax.jit
    @general.merge_inputs
    def step(m, x):
        m.count[...] += 1
        return m.w[...] * x

    np.testing.assert_allclose(step(m, 2.0), [2.0, 2.0, 2.0])
    step(m, 2.0)
    assert int(m.count[...]) == 2

    @general.merge_inputs
    def bump(m):
        m.count[...] += 10

    @general.merge_inputs
    def keep(m):
        pass

    general.split_inputs(jax.lax.cond)(True, bump, keep, m)
    general.split_inputs(jax.lax.cond)(False, bump, keep, m)
    assert int(m.count[...]) == 12


def test_split_merge_inputs_nest_under_vmap():
    class Env(nnx.Pytree):
        def __init__(self):
            self.index = nnx.Variable(jnp.arange(6))
            self.hits = nnx.Variable(jnp.zeros(6, jnp.int32))

    env = Env()

    @general.split_inputs
    @partial(jax.vmap, in_axes=(0,), out_axes=((0,), None))
    @general.merge_inputs
    def f(env):
        @general.merge_inputs
        def hit(env):
            env.hits[...] += 1

        @general.merge_inputs
        def miss(env):
            pass

        general.split_inputs(jax.lax.cond)(env.index[...] % 3 == 0, hit, miss, env)

    f(env)
    np.testing.assert_array_equal(env.hits[...], [1, 0, 0, 1, 0, 0])


def test_split_inputs_names_a_missing_merge_inputs():
    with pytest.raises(TypeError, match="merge_inputs"):
        general.split_inputs(jax.jit(lambda m: 1.0))(Counter())


def test_transform_metadata_inserts_and_removes_the_partition_axis():
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("din", "dout"))

    @nnx.vmap(in_axes=(None,), out_axes=0, axis_size=3, graph_updates=False)
    @nnx.transform_metadata(in_axes=(None,), out_axes=0, partition="layers")
    def make(rngs):
        return nnx.Linear(2, 4, kernel_init=init, rngs=rngs)

    seen = []

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry, graph_updates=False)
    @nnx.transform_metadata(in_axes=(0, nnx.Carry), out_axes=nnx.Carry, partition="layers")
    def apply(layer, x):
        seen.append(layer.kernel.out_sharding)
        return x @ layer.kernel[...][:, :2]

    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.make_mesh((1, 1, 1), ("layers", "din", "dout"), axis_types=auto)
    with jax.set_mesh(mesh):
        layers = make(nnx.Rngs(0))
        assert layers.kernel.shape == (3, 2, 4)
        assert layers.kernel.out_sharding == ("layers", "din", "dout")
        apply(layers, jnp.ones((1, 2)))
    assert seen == [("din", "dout")]
    assert layers.kernel.out_sharding == ("layers", "din", "dout")


def test_prefix_checks_happen_when_the_transform_is_made():
    with pytest.raises(ValueError, match="Graph nodes are not allowed as prefixes"):
        nnx.vmap(lambda m: m, in_axes=nnx.Dict(a=nnx.Param(1)))
    with pytest.raises(ValueError, match="Variables prefixes are not supported"):
        nnx.vmap(lambda v: v, in_axes=(nnx.Variable(0),), graph=False)
    with pytest.raises(ValueError, match="cannot contain `StateAxes` objects"):
        nnx.vmap(lambda m: m, in_axes=nnx.StateAxes({...: 0}), graph=False)
    with pytest.raises(ValueError, match="cannot contain `DiffState` objects"):
        nnx.grad(lambda m: 0.0, argnums=nnx.DiffState(0, nnx.Param), graph_updates=False)
    with pytest.raises(ValueError, match="does not take bound methods"):
        nnx.jit(Counter().__init__)


def test_keyword_arguments_take_their_in_axes_entry():
    @nnx.vmap(in_axes=(0, None))
    def f(x, y):
        return x + y

    np.testing.assert_allclose(f(jnp.arange(3.0), y=jnp.ones(())), [1.0, 2.0, 3.0])


def test_scan_stacks_objects_created_inside_and_reuses_its_trace():
    traces = 0

    @nnx.split_rngs(splits=4)
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0), length=4)
    def make(c, rngs):
        nonlocal traces
        traces += 1
        return c + 1, nnx.Linear(2, 2, rngs=rngs)

    c, layers = make(jnp.array(0), nnx.Rngs(0))
    assert int(c) == 4 and layers.kernel.shape == (4, 2, 2)
    singles = [nnx.Linear(2, 2, rngs=nnx.Rngs(0)) for _ in range(1)]
    assert singles[0].kernel.shape == (2, 2)
    assert not np.allclose(layers.kernel[...][0], layers.kernel[...][1])  # split keys

    @nnx.scan(in_axes=(nnx.Carry, 0))
    def step(count, x):
        nonlocal traces
        traces += 1
        return count + 1, x**2

    traces = 0
    for _ in range(3):
        count, ys = step(jnp.array(0), jnp.arange(5.0))
    assert traces == 1 and int(count) == 5
    np.testing.assert_allclose(ys, jnp.arange(5.0) ** 2)


def test_scan_rejects_a_new_carried_object():
    count = nnx.Variable(jnp.array(0))

    @nnx.scan
    def f(count, x):
        return nnx.Variable(count[...] + 1), x

    with pytest.raises(ValueError, match="identity must be preserved"):
        f(count, jnp.arange(3))


def test_scan_axis_rules_are_checked_when_made():
    with pytest.raises(ValueError, match="Found multiple Carry definitions"):
        nnx.scan(lambda a, b: (a, b), in_axes=(nnx.Carry, nnx.Carry))
    with pytest.raises(ValueError, match="the other must also have Carry"):
        nnx.scan(lambda a, b: a, in_axes=0, out_axes=(nnx.Carry, 0))
    with pytest.raises(ValueError, match="Cannot broadcast output state. Got StateAxes"):
        nnx.scan(lambda a, b: (a, b), out_axes=(nnx.Carry, nnx.StateAxes({...: None})))


def test_grads_without_graph_updates_are_shaped_like_the_argument():
    p1, p2 = nnx.Param(10.0), nnx.Param(20.0)
    tree = {"a": [p1, p2], "b": p1}
    grads = nnx.grad(lambda t: t["a"][0] + t["a"][1] + t["b"], graph_updates=False)(tree)
    assert isinstance(grads["a"][0], nnx.Param) and grads["a"][0] is not p1
    assert float(grads["a"][0][...]) == 2.0 and float(grads["a"][1][...]) == 1.0
    assert len(jax.tree.leaves(grads)) == 3

    m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    for graph in (True, False):
        g = nnx.grad(
            lambda m: m.kernel[...].sum() + 2 * m.bias[...].sum(), graph=graph, graph_updates=False
        )(m)
        assert type(g) is nnx.Linear
        np.testing.assert_allclose(g.kernel[...], np.ones((2, 3)))
        np.testing.assert_allclose(g.bias[...], 2 * np.ones(3))


def test_scan_without_graph_updates_refuses_to_return_an_input_variable():
    v = nnx.Param(jnp.arange(5))

    @nnx.scan(in_axes=0, out_axes=0, graph=True, graph_updates=False)
    def f(carry):
        return carry

    with pytest.raises(ValueError, match="does not support Variable aliasing"):
        f(v)
    out = nnx.scan(lambda c: c + 1, in_axes=0, out_axes=0, graph_updates=False)(jnp.arange(3))
    np.testing.assert_array_equal(out, [1, 2, 3])

    count = nnx.Variable(jnp.array(0))  # a carried Variable may come back: it is the carry

    @nnx.scan(graph_updates=False)
    def g(count, x):
        count[...] += 1
        return count, x

    out_count, _ = g(count, jnp.arange(5))
    assert out_count is count and int(count[...]) == 5


def test_a_broadcast_variable_updated_per_example_is_named_by_path():
    class Env(nnx.Module):
        def __init__(self):
            self.shared = nnx.BatchStat(jnp.array(0))
            self.index = nnx.Variable(jnp.arange(4))

    @nnx.vmap(in_axes=(nnx.StateAxes({nnx.BatchStat: None, ...: 0}),))
    def f(env):
        env.shared[...] += env.index[...]

    with pytest.raises(ValueError, match="at vmap state BatchStat 'shared', got axis spec None"):
        f(Env())
