"""Sharding on Auto and Explicit meshes, optimizer state sharding, and the pieces of the
reference's spmd / partitioning / integration behaviour refax matches (8 simulated devices:
XLA_FLAGS=--xla_force_host_platform_device_count=8)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.layout import Format, Layout
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from refax import nnx, spmd

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
AUTO, EXPLICIT = AxisType.Auto, AxisType.Explicit


def _mesh(*types):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=types or (AUTO, AUTO))


# -- Variable.sharding is the value's sharding ---------------------------------------------------
@needs_8
def test_variable_sharding_attribute_is_the_values_named_sharding():
    mesh = _mesh()
    with jax.set_mesh(mesh):
        v = nnx.Param(jnp.arange(32.0).reshape(4, 8), out_sharding=("data", "model"))
    assert isinstance(v.sharding, NamedSharding)
    assert v.sharding.spec == P("data", "model")
    assert v.sharding.shard_shape(v.shape) == (2, 2)
    assert v.out_sharding == ("data", "model")  # the metadata is still there
    np.testing.assert_array_equal(v[...], np.arange(32.0).reshape(4, 8))


@needs_8
def test_jit_created_module_is_sharded_as_annotated():
    mesh = _mesh()
    init = nnx.with_partitioning(lambda: jnp.ones((8, 4)), ("model", "data"))

    @jax.jit
    def create():
        return nnx.split(nnx.Dict(w=nnx.Param(init())))

    with jax.set_mesh(mesh):
        m = nnx.merge(*create())
    assert m["w"].sharding.shard_shape((8, 4)) == (2, 2)
    assert float(m["w"][...].sum()) == 32.0


# -- Explicit meshes ------------------------------------------------------------------------
@needs_8
def test_with_partitioning_on_an_explicit_mesh_eagerly_and_under_jit():
    mesh = _mesh(EXPLICIT, EXPLICIT)
    init = nnx.with_partitioning(nnx.initializers.ones, (None, "model"))
    with jax.set_mesh(mesh):
        eager = nnx.Linear(8, 16, kernel_init=init, rngs=nnx.Rngs(0))
        jitted = nnx.jit(lambda: nnx.Linear(8, 16, kernel_init=init, rngs=nnx.Rngs(0)))()
        x = jax.device_put(jnp.ones((4, 8)), P("data", None))
        y = eager(x)
    for m in (eager, jitted):
        assert str(jax.typeof(m.kernel[...])) == "float32[8,16@model]"
        np.testing.assert_array_equal(m.kernel[...], np.ones((8, 16)))
    assert str(jax.typeof(y)) == "float32[4@data,16@model]"
    np.testing.assert_allclose(y, np.full((4, 16), 8.0))


@needs_8
def test_explicit_mesh_abstract_model_and_train_step_keep_shardings():
    mesh = _mesh(EXPLICIT, EXPLICIT)
    init = nnx.with_partitioning(nnx.initializers.ones, (None, "model"))

    def create():
        return nnx.Linear(8, 16, kernel_init=init, rngs=nnx.Rngs(0))

    gdef, abs_state = nnx.get_abstract_model(create, mesh)
    kernel = abs_state["kernel"].get_value()
    assert kernel.shape == (8, 16) and kernel.sharding.spec == P(None, "model")
    with jax.set_mesh(mesh):
        model = create()
        opt = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
        x = jax.device_put(jnp.ones((4, 8)), P("data", None))

        @nnx.jit
        def step(model, opt, x):
            grads = nnx.grad(lambda m: m(x).sum())(model)
            opt.update(model, grads)

        step(model, opt, x)
    assert str(jax.typeof(model.kernel[...])) == "float32[8,16@model]"
    # d(sum(x @ k + b))/dk = 4 everywhere (4 rows of ones); sgd(0.5): 1 - 2 = -1
    np.testing.assert_allclose(model.kernel[...], -np.ones((8, 16)))
    np.testing.assert_allclose(model.bias[...], -2.0 * np.ones(16))


@needs_8
def test_mixed_axis_types_are_an_error_and_explicit_or_auto_work():
    for types in ((AUTO, AUTO), (EXPLICIT, EXPLICIT)):
        mesh = _mesh(*types)
        v = nnx.Variable(jnp.ones((4, 8)), out_sharding=("data", "model"), mesh=mesh)
        assert v.sharding.mesh == mesh and v.sharding.spec == P("data", "model")
    with pytest.raises(ValueError, match="all Explicit or all Auto"):
        nnx.Variable(jnp.ones((4, 8)), out_sharding=("data", "model"), mesh=_mesh(AUTO, EXPLICIT))
    # opting out of eager sharding skips the mesh entirely
    v = nnx.Variable(
        jnp.ones((4, 8)), out_sharding=("data", "model"), mesh=_mesh(AUTO, EXPLICIT),
        eager_sharding=False,
    )  # fmt: skip
    assert len(v.sharding.device_set) == 1


@needs_8
def test_out_sharding_as_partition_spec_named_sharding_or_format():
    mesh = _mesh()
    ns = NamedSharding(mesh, P("data", None))
    with jax.set_mesh(mesh):
        v_spec = nnx.Variable(jnp.ones((4, 8)), out_sharding=P("data", "model"))
    v_named = nnx.Variable(jnp.ones((4, 8)), out_sharding=ns)  # no mesh context: its own mesh
    v_format = nnx.Variable(jnp.ones((4, 8)), out_sharding=Format(Layout((1, 0)), ns))
    assert v_spec.sharding.spec == P("data", "model")
    assert v_named.sharding.is_equivalent_to(ns, 2)
    assert v_format.sharding == ns
    for v in (v_spec, v_named, v_format):
        np.testing.assert_array_equal(v[...], np.ones((4, 8)))


@needs_8
def test_get_partition_spec_and_named_sharding_trees():
    mesh = _mesh()
    p = nnx.Param(jnp.ones((4, 8)), out_sharding=("batch", None), eager_sharding=False)
    with spmd.logical_axis_rules([("batch", "data")]):
        specs = nnx.get_partition_spec({"p": p, "x": jnp.ones(3)})
        named = nnx.get_named_sharding({"p": p, "x": jnp.ones(3)}, mesh)
    assert specs["p"].get_value() == P("data", None) and specs["x"] == P()
    assert named["p"].get_value() == NamedSharding(mesh, P("data", None))
    assert named["x"] == NamedSharding(mesh, P())


@needs_8
def test_abstract_model_of_shared_variable_has_one_leaf():
    mesh = _mesh()

    class Foo(nnx.Module):
        def __init__(self):
            init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
            self.linear = nnx.Linear(8, 8, use_bias=False, kernel_init=init, rngs=nnx.Rngs(0))
            self.shared = self.linear.kernel

    _, abs_state = nnx.compat.get_abstract_model(Foo, mesh)
    (leaf,) = jax.tree.leaves(abs_state)
    assert leaf.shape == (8, 8)
    assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2)


# -- optimizer state ------------------------------------------------------------------------
@needs_8
def test_optimizer_sharding_metadata_shards_only_the_optimizer_state():
    mesh = _mesh()
    with jax.set_mesh(mesh):
        model = nnx.Linear(
            4, 8, rngs=nnx.Rngs(0), kernel_metadata={"optimizer_sharding": ("data", "model")}
        )
        opt = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
    mu = opt.opt_state[0].mu["kernel"]
    assert type(mu) is nnx.OptVariable
    assert mu.out_sharding == ("data", "model") and not mu.has_metadata("optimizer_sharding")
    assert mu.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model")), 2)
    assert model.kernel.sharding.is_equivalent_to(NamedSharding(mesh, P()), 2)
    assert model.kernel.get_metadata("optimizer_sharding") == ("data", "model")


def test_optimizer_update_accepts_a_module_of_gradients():
    x = jnp.arange(6.0).reshape(2, 3)

    def loss(m):
        return jnp.sum(m(x) ** 2)

    a = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    b = nnx.clone(a)
    opt_a = nnx.Optimizer(a, optax.adam(0.1), wrt=nnx.Param)
    opt_b = nnx.Optimizer(b, optax.adam(0.1), wrt=nnx.Param)
    for _ in range(2):
        opt_a.update(a, jax.grad(loss)(a))  # a Linear holding the gradients
        opt_b.update(b, nnx.grad(loss)(b))  # a State
    np.testing.assert_allclose(a.kernel[...], b.kernel[...], rtol=1e-6)
    np.testing.assert_allclose(a.bias[...], b.bias[...], rtol=1e-6)
    assert int(opt_a.step[...]) == 2


# -- layers ------------------------------------------------------------------------------------
@needs_8
def test_dropout_keeps_an_explicit_input_sharding():
    mesh = _mesh(EXPLICIT, EXPLICIT)
    with jax.set_mesh(mesh):
        x = jax.sharding.reshard(jnp.ones((4, 8)), P("data", None))
        for dims in ((), (1,)):
            layer = nnx.Dropout(0.5, broadcast_dims=dims, deterministic=False, rngs=nnx.Rngs(0))
            y = layer(x)
            assert str(jax.typeof(y)) == "float32[4@data,8]"
            assert set(np.unique(np.asarray(y))) <= {0.0, 2.0}


def test_batchnorm_with_hijax_stats_under_jax_grad():
    with nnx.var_defaults(hijax=True):
        model = nnx.Sequential(
            nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
            nnx.BatchNorm(3, use_running_average=False, momentum=0.5, rngs=nnx.Rngs(0)),
        )
    x = jnp.arange(8.0).reshape(4, 2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

    grads = jax.grad(loss)(nnx.with_vars(params, hijax=False))
    h = x @ params["layers"][0]["kernel"][...] + params["layers"][0]["bias"][...]
    np.testing.assert_allclose(model.layers[1].mean[...], 0.5 * h.mean(0), rtol=1e-5)
    assert jax.tree.leaves(grads)[0].shape == (3,)


def test_update_writes_into_the_references_of_ref_variables():
    with nnx.var_defaults(ref=True):
        r = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    ref_before = r.kernel.get_raw_value()
    nnx.update(r, {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.ones(2)})
    assert r.kernel.get_raw_value() is ref_before  # same reference, new contents
    np.testing.assert_array_equal(r.kernel[...], np.full((2, 2), 3.0))

    with nnx.var_defaults(hijax=True):
        m = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    nnx.update(m, {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.ones(2)})
    assert m.kernel.hijax

    @jax.jit
    def step():
        nnx.update(m, {"kernel": m.kernel[...] * 2, "bias": m.bias[...]})

    step()
    np.testing.assert_array_equal(m.kernel[...], np.full((2, 2), 6.0))


# -- graph helpers -------------------------------------------------------------------------------
def test_set_attributes_takes_a_graph_mode():
    shared = nnx.Dropout(0.1)
    model = nnx.Dict(a=shared, b=shared, c=nnx.Dropout(0.2))
    model.set_attributes(deterministic=True, graph=True)
    assert shared.deterministic is True and model["c"].deterministic is True


def test_split_rejects_everything_before_the_last_filter():
    m = nnx.Dict(a=nnx.Param(1), b=nnx.BatchStat(2))
    with pytest.raises(ValueError, match="can only be used as the last filters"):
        nnx.split(m, ..., nnx.Param)
    _, params, rest = nnx.split(m, nnx.Param, ...)
    assert set(params) == {"a"} and set(rest) == {"b"}


def test_vmap_transform_metadata_updates_other_tuple_metadata():
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "nickname": "nick"})
    def make(rngs):
        w = nnx.initializers.ones(rngs.params(), (2, 4))
        return nnx.Param(w, out_sharding=("a", "b"), nickname=("in", "out"), eager_sharding=False)

    p = make(nnx.Rngs(0))
    assert p.shape == (3, 2, 4)
    assert p.out_sharding == ("layers", "a", "b")
    assert p.nickname == ("nick", "in", "out")
    np.testing.assert_array_equal(p[...], np.ones((3, 2, 4)))
