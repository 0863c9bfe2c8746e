"""ToNNX / ToLinen: variables, metadata, RNG streams and transforms across the boundary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx as fnnx
from flax.nnx import bridge as fbridge

from refax import nnx
from refax.nnx import bridge


def _mesh():
    return jax.make_mesh((2, 4), ("in", "out"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dropout(0.5, deterministic=not train)(x)


# -- ToNNX -----------------------------------------------------------------------------------
def test_to_nnx_variable_types_and_values():
    x = jnp.ones((3, 2))
    model = bridge.ToNNX(LinenBlock(), rngs=nnx.Rngs(0, dropout=1)).lazy_init(x)
    state = nnx.state(model, nnx.Not(nnx.RngState))
    assert isinstance(model.Dense_0["kernel"], nnx.Param)
    assert isinstance(model.BatchNorm_0["mean"], nnx.BatchStat)
    assert {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))} == {
        ("BatchNorm_0", "mean"),
        ("BatchNorm_0", "var"),
    }
    linen_vars = {
        "params": nnx.to_pure_dict(nnx.state(state, nnx.Param)),
        "batch_stats": nnx.to_pure_dict(nnx.state(state, nnx.BatchStat)),
    }
    y = model(x, train=False)
    np.testing.assert_allclose(y, LinenBlock().apply(linen_vars, x, train=False), rtol=1e-6)


def test_to_nnx_same_params_as_reference():
    x = jnp.ones((1, 3))
    ours = bridge.ToNNX(nn.Dense(4), rngs=nnx.Rngs(0)).lazy_init(x)
    ref = fbridge.ToNNX(nn.Dense(4), rngs=fnnx.Rngs(0)).lazy_init(x)
    np.testing.assert_array_equal(ours.kernel[...], ref.kernel[...])


def test_to_nnx_mutable_batch_stats_written_back():
    x = jax.random.normal(jax.random.key(0), (8, 2))
    model = bridge.ToNNX(LinenBlock(), rngs=nnx.Rngs(0)).lazy_init(x)
    before = model.BatchNorm_0["mean"][...]
    model(x, mutable=["batch_stats"])
    assert not np.allclose(before, model.BatchNorm_0["mean"][...])
    frozen = model.BatchNorm_0["mean"][...]
    model(x, train=False)  # running averages used: unchanged
    np.testing.assert_array_equal(frozen, model.BatchNorm_0["mean"][...])


@pytest.mark.parametrize("jit", [False, True])
def test_to_nnx_dropout_fresh_keys_each_call(jit):
    x = jnp.ones((2, 16))
    model = bridge.ToNNX(nn.Dropout(0.5, deterministic=False), rngs=nnx.Rngs(dropout=3))
    model = bridge.lazy_init(model, x)
    call = nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x))
    y1, y2 = call(model, x), call(model, x)
    assert not np.array_equal(y1, y2)
    nnx.reseed(model, dropout=3)
    y3 = call(model, x)
    nnx.reseed(model, dropout=3)
    np.testing.assert_array_equal(y3, call(model, x))


def test_to_nnx_partitioning_metadata_and_sharding():
    dense = nn.Dense(
        8,
        kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("in", "out")),
        bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("o",), rules=(("o", "out"),)
        ),
    )
    x = jnp.ones((1, 4))
    with jax.set_mesh(_mesh()):
        model = bridge.ToNNX(dense, rngs=nnx.Rngs(0)).lazy_init(x)
        specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert model.kernel.out_sharding == ("in", "out")
    assert model.bias.sharding_rules == (("o", "out"),)
    assert specs["kernel"].get_value() == jax.sharding.PartitionSpec("in", "out")
    assert specs["bias"].get_value() == jax.sharding.PartitionSpec("out")
    assert model.kernel[...].sharding.spec == jax.sharding.PartitionSpec("in", "out")
    # back to Linen: the same kind of boxes
    linen_vars = model._linen_variables()
    assert isinstance(linen_vars["params"]["kernel"], nn.Partitioned)
    assert isinstance(linen_vars["params"]["bias"], nn.LogicallyPartitioned)
    np.testing.assert_allclose(model(x), dense.apply(linen_vars, x), rtol=1e-6)


def test_to_nnx_under_grad_and_vmap():
    x = jnp.ones((3, 2))
    model = bridge.ToNNX(nn.Dense(4), rngs=nnx.Rngs(0)).lazy_init(x)
    grads = nnx.grad(lambda m: jnp.sum(m(x)))(model)
    np.testing.assert_allclose(grads["kernel"][...], jnp.full((2, 4), 3.0))
    ys = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(model, jnp.ones((5, 3, 2)))
    assert ys.shape == (5, 3, 4)


def test_to_nnx_lazy_init_inside_vmap_stacks():
    class Outer(nnx.Module):
        def __init__(self, rngs):
            self.inner = bridge.ToNNX(nn.Dense(3), rngs=rngs)
            self.rngs = rngs

        def __call__(self, x):
            @nnx.split_rngs(splits=4)
            @nnx.vmap(in_axes=(0, None), axis_size=4)
            def f(inner, x):
                return inner(x)

            return f(self.inner, x)

    model = bridge.lazy_init(Outer(nnx.Rngs(0)), jnp.ones((2, 5)))
    assert model.inner.kernel.shape == (4, 5, 3)
    k = model.inner.kernel[...]
    assert not np.allclose(k[0], k[1])


def test_to_nnx_custom_collection_type():
    @nnx.register_variable_name("refax_test_counts", overwrite=True)
    class Counts(nnx.Variable):
        pass

    class Counter(nn.Module):
        @nn.compact
        def __call__(self):
            c = self.variable("refax_test_counts", "n", lambda: jnp.zeros((), jnp.int32))
            if not self.is_initializing():
                c.value += 1
            return c.value

    model = bridge.ToNNX(Counter()).lazy_init()
    assert type(model.n) is Counts
    model(mutable=True)
    model(mutable=True)
    assert int(model.n[...]) == 2


# -- ToLinen ---------------------------------------------------------------------------------
class NNXBlock(nnx.Module):
    def __init__(self, din, dout, *, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.bn = nnx.BatchNorm(dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.bn(self.linear(x)))


def test_to_linen_collections_and_types():
    model = bridge.to_linen(NNXBlock, 3, 4)
    x = jax.random.normal(jax.random.key(0), (5, 3))
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    assert set(variables) == {"params", "batch_stats"}
    assert variables["params"]["linear"]["kernel"].shape == (3, 4)
    np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], jnp.zeros(4))
    _, updates = model.apply(
        variables, x, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"]
    )
    assert set(updates) == {"batch_stats"}
    assert not np.allclose(updates["batch_stats"]["bn"]["mean"], 0.0)


def test_to_linen_same_params_as_reference():
    x = jnp.ones((1, 3))
    ours = bridge.to_linen(nnx.Linear, 3, 4).init(jax.random.key(0), x)
    ref = fbridge.to_linen(fnnx.Linear, 3, 4).init(jax.random.key(0), x)
    np.testing.assert_array_equal(ours["params"]["kernel"], ref["params"]["kernel"])


def test_to_linen_dropout_fresh_keys_each_apply():
    model = bridge.to_linen(nnx.Dropout, 0.5, deterministic=False)
    x = jnp.ones((4, 16))
    variables = model.init(jax.random.key(0), x)
    y1 = model.apply(variables, x, rngs={"dropout": jax.random.key(1)})
    y2 = model.apply(variables, x, rngs={"dropout": jax.random.key(2)})
    y1b = jax.jit(lambda v, k: model.apply(v, x, rngs={"dropout": k}))(variables, jax.random.key(1))
    assert not np.array_equal(y1, y2)
    np.testing.assert_array_equal(y1, y1b)


def test_to_linen_metadata_and_partition_spec():
    model = bridge.to_linen(
        nnx.Linear,
        4,
        8,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("in", "out")),
    )
    x = jnp.ones((1, 4))
    with jax.set_mesh(_mesh()):
        variables = model.init(jax.random.key(0), x)
        specs = nn.get_partition_spec(variables)
    kernel = variables["params"]["kernel"]
    assert isinstance(kernel, bridge.NNXMeta)
    assert kernel.var_type is nnx.Param
    assert kernel.metadata["out_sharding"] == ("in", "out")
    assert specs["params"]["kernel"] == jax.sharding.PartitionSpec("in", "out")
    np.testing.assert_allclose(model.apply(variables, x), x @ kernel.value, rtol=1e-6)


def test_to_linen_under_nn_vmap_adds_partition_axis():
    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            inner = nn.vmap(
                bridge.ToLinen,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(
                nnx.Linear,
                args=(3, 2),
                kwargs={"kernel_init": nnx.with_partitioning(nnx.initializers.ones, (None, "out"))},
            )
            return inner(x)

    x = jnp.ones((4, 3))
    variables = Outer().init(jax.random.key(0), x)
    kernel = variables["params"]["VmapToLinen_0"]["kernel"]
    assert kernel.value.shape == (4, 3, 2)
    assert kernel.metadata["out_sharding"] == ("layers", None, "out")
    assert Outer().apply(variables, x).shape == (4, 2)


def test_to_linen_grad_through_linen_apply():
    model = bridge.to_linen(nnx.Linear, 2, 1)
    x = jnp.ones((3, 2))
    params = model.init(jax.random.key(0), x)["params"]
    grads = jax.grad(lambda p: model.apply({"params": p}, x).sum())(params)
    np.testing.assert_allclose(grads["kernel"], jnp.full((2, 1), 3.0))


def test_nested_linen_nnx_linen_nnx():
    class NNXInner(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 3, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, deterministic=False, rngs=rngs)

        def __call__(self, x):
            return self.dropout(self.linear(x))

    class LinenMiddle(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(bridge.ToLinen(NNXInner, name="inner")(x))

    class Outer(nnx.Module):
        def __init__(self, rngs):
            self.middle = bridge.ToNNX(LinenMiddle(), rngs=rngs)

        def __call__(self, x):
            return self.middle(x)

    x = jnp.ones((2, 3))
    model = bridge.lazy_init(Outer(nnx.Rngs(0, dropout=1)), x)
    assert isinstance(model.middle.inner["linear"]["kernel"], nnx.Param)
    step = nnx.jit(lambda m, x: m(x))
    assert not np.array_equal(step(model, x), step(model, x))
    grads = nnx.grad(lambda m: jnp.sum(m(x)))(model)
    assert grads["middle"]["inner"]["linear"]["kernel"][...].shape == (3, 3)


def test_functional():
    f = bridge.functional(nnx.BatchNorm)(3, use_running_average=False)
    state = f.init(rngs=nnx.Rngs(0))
    y, new_state = f.apply(state)(jnp.arange(6.0).reshape(2, 3))
    assert y.shape == (2, 3)
    assert not np.allclose(new_state["mean"][...], state["mean"][...])
