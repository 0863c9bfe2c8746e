"""bridge.Module: Linen-style modules that are refax Modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from refax import nnx
from refax.nnx import bridge


class Dense(bridge.Module):
    features: int

    @bridge.compact
    def __call__(self, x):
        w = self.param("w", nnx.initializers.lecun_normal(), (x.shape[-1], self.features))
        b = self.param("b", nnx.initializers.zeros, (self.features,))
        return x @ w + b


class LinenDense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        b = self.param("b", nn.initializers.zeros, (self.features,))
        return x @ w + b


class MLP(bridge.Module):
    @bridge.compact
    def __call__(self, x):
        return Dense(2)(jax.nn.relu(Dense(4)(x)))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        # Linen names at construction: the outer Dense(2) is built first
        return LinenDense(2, name="Dense_0")(jax.nn.relu(LinenDense(4, name="Dense_1")(x)))


def test_compact_names_and_values_match_linen():
    x = jax.random.normal(jax.random.key(0), (3, 5))
    variables = MLP().init(jax.random.key(1), x)
    linen_vars = LinenMLP().init(jax.random.key(1), x)
    assert jax.tree.structure(variables) == jax.tree.structure(linen_vars)
    np.testing.assert_allclose(MLP().apply(variables, x), LinenMLP().apply(variables, x), rtol=1e-6)


def test_module_is_refax_module_and_unchanged_by_init_apply():
    model = MLP()
    assert isinstance(model, nnx.Module)
    variables = model.init(0, jnp.ones((1, 3)))
    model.apply(variables, jnp.ones((1, 3)))
    assert model.scope is None
    assert "Dense_0" not in vars(model)


def test_setup_names_from_attributes_and_lists():
    class Stack(bridge.Module):
        n: int

        def setup(self):
            self.first = Dense(3)
            self.rest = [Dense(3, name=f"layer_{i}") for i in range(self.n)]

        def __call__(self, x):
            x = self.first(x)
            for layer in self.rest:
                x = layer(x)
            return x

    x = jnp.ones((2, 3))
    variables = Stack(2).init(0, x)
    assert set(variables["params"]) == {"first", "layer_0", "layer_1"}
    assert Stack(2).apply(variables, x).shape == (2, 3)


def test_variable_collections_and_mutable():
    @nnx.register_variable_name("refax_test_counter", overwrite=True)
    class Counter(nnx.Variable):
        pass

    class Count(bridge.Module):
        @bridge.compact
        def __call__(self):
            c = self.variable("refax_test_counter", "n", lambda: jnp.zeros((), jnp.int32))
            assert type(c) is Counter
            c[...] += 1
            return c[...]

    variables = Count().init()
    assert int(variables["refax_test_counter"]["n"]) == 1
    out, updates = Count().apply(variables, mutable="refax_test_counter")
    assert int(out) == 2 and int(updates["refax_test_counter"]["n"]) == 2
    assert int(Count().apply(variables)) == 2  # not mutable: nothing returned


def test_with_partitioning_gives_linen_boxes():
    class Sharded(bridge.Module):
        @bridge.compact
        def __call__(self, x):
            init = bridge.with_partitioning(nnx.initializers.ones, ("in", "out"))
            return x @ self.param("w", init, (x.shape[-1], 4))

    x = jnp.ones((2, 2))
    mesh = jax.make_mesh((2, 4), ("in", "out"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        variables = Sharded().init(0, x)
        y = Sharded().apply(variables, x)
    w = variables["params"]["w"]
    assert isinstance(w, nn.Partitioned) and w.names == ("in", "out")
    assert nn.get_partition_spec(variables)["params"]["w"] == jax.sharding.PartitionSpec(
        "in", "out"
    )
    np.testing.assert_allclose(y, jnp.full((2, 4), 2.0))


def test_missing_param_raises_linen_error():
    with pytest.raises(bridge.module.Module.__module__ and Exception, match="w"):
        Dense(2).apply({"params": {"b": jnp.zeros(2)}}, jnp.ones((1, 3)))


def test_interop_submodules_and_rngs():
    class Mixed(bridge.Module):
        @bridge.compact
        def __call__(self, x):
            x = bridge.nnx_in_bridge_mdl(lambda r: nnx.Linear(3, 4, rngs=r))(x)
            x = bridge.linen_in_bridge_mdl(nn.Dropout(0.5, deterministic=False))(x)
            return bridge.linen_in_bridge_mdl(nn.Dense(2), name="head")(x)

    x = jnp.ones((2, 3))
    variables = Mixed().init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    assert set(variables["params"]) == {"Linear_0", "head"}
    y1 = Mixed().apply(variables, x, rngs={"dropout": jax.random.key(2)})
    y2 = Mixed().apply(variables, x, rngs={"dropout": jax.random.key(3)})
    assert not np.array_equal(y1, y2)
    y1b = jax.jit(lambda v, k: Mixed().apply(v, x, rngs={"dropout": k}))(
        variables, jax.random.key(2)
    )
    np.testing.assert_allclose(y1, y1b, rtol=1e-6)


def test_apply_under_jit_and_grad():
    x = jnp.ones((4, 3))
    variables = MLP().init(0, x)

    @jax.jit
    def step(params):
        grads = jax.grad(lambda p: MLP().apply({"params": p}, x).sum())(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    new = step(variables["params"])
    assert jax.tree.structure(new) == jax.tree.structure(variables["params"])


def test_refax_transforms_inside_setup_and_call():
    class Layers(bridge.Module):
        def setup(self):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(nnx.StateAxes({nnx.RngState: 0, ...: None}),), axis_size=3)
            def build(parent):
                parent.block = Dense(4)

            build(self)

        def __call__(self, x):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0, None), axis_size=3)
            def run(block, x):
                return block(x)  # creates the params inside vmap while initialising

            return run(self.block, x)

    variables = Layers().init(0, jnp.ones((1, 4)))
    w = variables["params"]["block"]["w"]
    assert w.shape == (3, 4, 4)
    assert not np.allclose(w[0], w[1])
    y = Layers().apply(variables, jnp.ones((2, 4)))
    np.testing.assert_allclose(y[1], jnp.ones((2, 4)) @ w[1], rtol=1e-6)


def test_attr_priority_picks_the_linen_name():
    class Top(bridge.Module):
        def setup(self):
            self.zzz = Dense(2)
            self.set_attr_priority("zzz", bridge.AttrPriority.HIGH)
            self.aaa = self.zzz

        def __call__(self, x):
            return self.aaa(x)

    params = Top().init(0, jnp.ones((1, 3)))["params"]
    assert set(params) == {"zzz"}


def test_current_module_and_context():
    seen = []

    class Probe(bridge.Module):
        @bridge.compact
        def __call__(self):
            frame = bridge.current_context()
            seen.append((frame.module is self, frame.in_compact, bridge.current_module() is self))

    Probe().apply({})
    assert seen == [(True, True, True)]
    assert bridge.current_module() is None
