"""refax.spmd: partition metadata, logical axis rules, eager sharding; flax.nnx as the oracle.

The multi-device tests need 8 devices: run with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (CPU devices); they skip otherwise.
"""

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from refax import nnx, spmd

F = pytest.importorskip("flax.nnx")

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
AXIS_TYPES = [AxisType.Explicit, AxisType.Auto]


def make_mesh(axis_type=AxisType.Explicit, shape=(2, 4), names=("a", "b")):
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def mlp(lib, rngs):
    """The same two-layer model in refax (``lib=nnx``) or flax (``lib=F``)."""
    sp = spmd if lib is nnx else F
    init = sp.with_partitioning(lib.initializers.lecun_normal(), ("a", "b"))
    bias_init = sp.with_partitioning(lib.initializers.zeros, ("b",))

    class MLP(lib.Module):
        def __init__(self):
            self.l1 = lib.Linear(4, 8, kernel_init=init, bias_init=bias_init, rngs=rngs)
            self.l2 = lib.Linear(8, 4, kernel_metadata={"out_sharding": ("emb", "mlp")}, rngs=rngs)

    return MLP()


def flat(tree):
    """``[(path, type name, value)]`` of a State-like tree of Variables (refax or flax)."""
    to_flat = F.to_flat_state if isinstance(tree, F.State) else nnx.to_flat_state
    out = []
    for path, v in to_flat(tree):
        value = v.get_value() if hasattr(v, "get_value") else v
        out.append((tuple(str(p) for p in path), type(v).__name__, value))
    return sorted(out, key=lambda t: t[0])


def specs_of(tree):
    return [(p, t, v.sharding.spec if hasattr(v, "sharding") else v) for p, t, v in flat(tree)]


RULES = [("emb", "b"), ("mlp", "a")]


@contextlib.contextmanager
def rules():
    """RULES bound for refax and for the reference (each keeps its own)."""
    with spmd.logical_axis_rules(RULES), F.logical_axis_rules(RULES):
        yield


# -- metadata helpers -------------------------------------------------------------------------
def test_partition_name_matches_reference():
    assert spmd.PARTITION_NAME == F.PARTITION_NAME == "partition_name"


def test_with_partitioning_metadata_without_mesh():
    init = spmd.with_partitioning(nnx.initializers.ones, (None, "model"), foo=1)
    p = nnx.Param(init(jax.random.key(0), (2, 3)))
    assert p.out_sharding == p.sharding_names == (None, "model")
    assert p.mesh is None and p.foo == 1
    # No mesh: the value is left alone (the reference raises ValueError here).
    np.testing.assert_array_equal(p.get_value(), np.ones((2, 3)))
    assert len(p.get_value().sharding.device_set) == 1


def test_get_partition_spec_mixed_tree_matches_reference():
    def tree(lib):
        return {
            "x": jnp.ones(3),
            "y": 1,
            "z": lib.Param(None),
            "w": lib.Param(jnp.ones((2, 2)), out_sharding=("a", None), eager_sharding=False),
            "r": lib.Param(
                jnp.ones(2), out_sharding=("x",), sharding_rules=(("x", "b"),), eager_sharding=False
            ),
        }

    ours, ref = spmd.get_partition_spec(tree(nnx)), F.get_partition_spec(tree(F))
    assert ours["x"] == ref["x"] == P() and ours["y"] is ref["y"] is None
    for key in "zwr":
        assert type(ours[key]).__name__ == type(ref[key]).__name__
        assert ours[key].get_value() == ref[key].get_value()
    assert ours["w"].out_sharding == ("a", None)  # the box keeps its metadata
    assert ours["r"].get_value() == P("b")


def test_get_partition_spec_on_module_keeps_structure():
    model = nnx.Linear(2, 3, kernel_metadata={"out_sharding": (None, "m")}, rngs=nnx.Rngs(0))
    specs = spmd.get_partition_spec(model)
    assert type(specs) is nnx.Linear
    assert specs.kernel.get_value() == P(None, "m") and specs.bias.get_value() == P()
    assert isinstance(model.kernel.get_value(), jax.Array)  # input untouched


# -- logical axis rules -----------------------------------------------------------------------
def test_logical_axis_rules_context():
    p = nnx.Param(jnp.ones((2, 3)), out_sharding=("batch", "embed"))
    assert spmd.get_partition_spec(p).get_value() == P("batch", "embed")
    with spmd.logical_axis_rules([("batch", "data"), ("embed", ("x", "y"))]):
        assert spmd.get_logical_axis_rules() == (("batch", "data"), ("embed", ("x", "y")))
        assert spmd.get_partition_spec(p).get_value() == P("data", ("x", "y"))
        with spmd.logical_axis_rules([("batch", None)]):
            assert spmd.get_partition_spec(p).get_value() == P(None, "embed")
        assert spmd.get_partition_spec(p).get_value() == P("data", ("x", "y"))
    assert spmd.get_logical_axis_rules() == ()


def test_logical_axis_rules_compose_with_variable_rules():
    p = nnx.Param(
        jnp.ones((2, 3)), out_sharding=("batch", "embed"), sharding_rules=[("embed", "m")]
    )
    assert spmd.get_partition_spec(p).get_value() == P("batch", "m")
    with spmd.logical_axis_rules([("batch", "d")]):
        assert spmd.get_partition_spec(p).get_value() == P("d", "m")
    with spmd.logical_axis_rules([("embed", "other")]), pytest.raises(ValueError, match="embed"):
        spmd.get_partition_spec(p)


def test_logical_axis_rules_as_decorator():
    @spmd.logical_axis_rules([("l", "d")])
    def spec():
        return spmd.get_partition_spec(nnx.Param(jnp.ones(2), out_sharding=("l",))).get_value()

    assert spec() == P("d") and spmd.get_logical_axis_rules() == ()


# -- eager sharding switch ----------------------------------------------------------------------
def test_use_eager_sharding_setter_context_decorator():
    assert spmd.using_eager_sharding() is True
    try:
        spmd.use_eager_sharding(False)
        assert spmd.using_eager_sharding() is False
        with spmd.use_eager_sharding(True):
            assert spmd.using_eager_sharding() is True
        assert spmd.using_eager_sharding() is False

        @spmd.use_eager_sharding(True)
        def inner():
            return spmd.using_eager_sharding()

        assert spmd.using_eager_sharding() is False and inner() is True
        assert spmd.use_eager_sharding.current_value() is False
    finally:
        spmd.use_eager_sharding(True)
    assert spmd.using_eager_sharding() is True


def test_eager_sharding_metadata_resolution():
    with spmd.use_eager_sharding(False):
        assert nnx.Param(jnp.ones(2), out_sharding=("a",)).eager_sharding is False
        assert nnx.Param(jnp.ones(2), out_sharding=("a",), eager_sharding=True).eager_sharding
        assert nnx.Param(jnp.ones(2)).eager_sharding  # no sharding metadata: not resolved
    assert nnx.Param(jnp.ones(2), out_sharding=("a",)).eager_sharding is True


# -- eager sharding on 8 devices ------------------------------------------------------------------
@needs8
@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_linear_eager_sharding_matches_reference(axis_type):
    mesh = make_mesh(axis_type)
    with rules(), jax.set_mesh(mesh):
        ours, ref = mlp(nnx, nnx.Rngs(0)), mlp(F, F.Rngs(0))
    assert ours.l1.kernel.get_value().sharding.spec == P("a", "b")
    assert ours.l2.kernel.get_value().sharding.spec == P("b", "a")  # through the rules
    assert specs_of(nnx.state(ours)) == specs_of(F.state(ref))
    np.testing.assert_allclose(ours.l1.kernel.get_value(), ref.l1.kernel.get_value())


@needs8
def test_eager_sharding_with_mesh_metadata_and_specs():
    mesh = make_mesh()
    init = spmd.with_partitioning(nnx.initializers.ones, ("a", "b"), mesh=mesh)
    p = nnx.Param(init(jax.random.key(0), (4, 8)))  # no mesh context: the metadata's mesh
    assert p.get_value().sharding == NamedSharding(mesh, P("a", "b"))
    with jax.set_mesh(mesh):
        q = nnx.Param(jnp.ones((8, 4)), out_sharding=P(("a", "b")))
        r = nnx.Param(jnp.ones((8, 4)), out_sharding=("x",), sharding_rules=[("x", ("a", "b"))])
        s = nnx.Param(np.ones((4, 8)), out_sharding=NamedSharding(mesh, P(None, "b")))
        rq = F.Param(jnp.ones((8, 4)), out_sharding=P(("a", "b")))
        rr = F.Param(jnp.ones((8, 4)), out_sharding=("x",), sharding_rules=[("x", ("a", "b"))])
    assert q.get_value().sharding.spec == rq.get_value().sharding.spec == P(("a", "b"), None)
    assert r.get_value().sharding.spec == rr.get_value().sharding.spec
    assert s.get_value().sharding.spec == P(None, "b")


@needs8
def test_eager_sharding_disabled():
    mesh = make_mesh()
    with jax.set_mesh(mesh):
        a = nnx.Param(jnp.ones((4, 8)), out_sharding=("a", "b"), eager_sharding=False)
        with spmd.use_eager_sharding(False):
            b = nnx.Param(jnp.ones((4, 8)), out_sharding=("a", "b"))
            c = nnx.Param(jnp.ones((4, 8)), out_sharding=("a", "b"), eager_sharding=True)
    assert a.get_value().sharding.spec == b.get_value().sharding.spec == P(None, None)
    assert c.get_value().sharding.spec == P("a", "b")


@needs8
@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_eager_sharding_inside_traces(axis_type):
    mesh = make_mesh(axis_type)

    def create():
        return nnx.Param(jnp.ones((4, 8)), out_sharding=("a", "b")).get_value()

    with jax.set_mesh(mesh):
        assert jax.jit(create)().sharding.spec == P("a", "b")
        abstract = jax.eval_shape(create)
    if axis_type == AxisType.Explicit:  # the sharding is part of the abstract type
        assert abstract.sharding.spec == P("a", "b")


@needs8
def test_eager_sharding_mixed_axis_types_in_trace_raises():
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Explicit, AxisType.Auto))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="all Explicit or all Auto"):
        jax.jit(lambda: nnx.Param(jnp.ones((4, 8)), out_sharding=("a", None)).get_value())()


# -- partition specs and named shardings of a model --------------------------------------------
@needs8
@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_get_partition_spec_and_named_sharding_match_reference(axis_type):
    mesh = make_mesh(axis_type)
    with rules(), jax.set_mesh(mesh):
        ours, ref = nnx.state(mlp(nnx, nnx.Rngs(0))), F.state(mlp(F, F.Rngs(0)))
        ps, ref_ps = spmd.get_partition_spec(ours), F.get_partition_spec(ref)
        ns, ref_ns = spmd.get_named_sharding(ours, mesh), F.get_named_sharding(ref, mesh)
    assert isinstance(ps, nnx.State) and flat(ps) == flat(ref_ps)
    assert flat(ps)[1] == (("l1", "kernel"), "Param", P("a", "b"))
    assert ps["l1"]["kernel"].out_sharding == ("a", "b")
    assert flat(ns) == flat(ref_ns)
    assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in jax.tree.leaves(ns))


# -- sharded initialisation under jit --------------------------------------------------------------
@needs8
@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_sharded_init_with_sharding_constraint_and_update(axis_type):
    mesh = make_mesh(axis_type)

    def create_model(lib):
        @lib.jit
        def create():
            model = mlp(lib, lib.Rngs(0))
            state = lib.state(model)
            pspecs = lib.get_partition_spec(state) if lib is F else spmd.get_partition_spec(state)
            lib.update(model, jax.lax.with_sharding_constraint(state, pspecs))
            return model

        return create()

    with rules(), jax.set_mesh(mesh):
        ref, ours = create_model(F), create_model(nnx)
    assert ours.l1.kernel.get_value().sharding.spec == P("a", "b")
    assert ours.l2.kernel.get_value().sharding.spec == P("b", "a")
    assert specs_of(nnx.state(ours)) == specs_of(F.state(ref))
    np.testing.assert_allclose(ours.l1.kernel.get_value(), ref.l1.kernel.get_value(), rtol=1e-6)


@needs8
def test_sharded_init_with_out_shardings():
    mesh = make_mesh(AxisType.Auto)
    replicated = NamedSharding(mesh, P())

    def make():
        return nnx.Linear(4, 8, kernel_metadata={"out_sharding": ("a", "b")}, rngs=nnx.Rngs(0))

    with jax.set_mesh(mesh):
        model = nnx.jit(make, out_shardings=replicated)()  # one sharding for all outputs
        assert model.kernel.get_value().sharding.is_equivalent_to(replicated, 2)
        _, abs_state = spmd.get_abstract_model(make, mesh)
        shardings = nnx.to_pure_dict(spmd.get_named_sharding(abs_state, mesh))
        state = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make())), out_shardings=shardings)()
    assert state["kernel"].sharding.spec == P("a", "b") and state["bias"].sharding.spec == P()


# -- abstract models ------------------------------------------------------------------------------
@needs8
@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_get_abstract_model_matches_reference(axis_type):
    mesh = make_mesh(axis_type)
    with rules():
        gdef, abs_state = spmd.get_abstract_model(lambda: mlp(nnx, nnx.Rngs(0)), mesh)
        _, ref_state = F.get_abstract_model(lambda: mlp(F, F.Rngs(0)), mesh)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abs_state))
    assert [(p, t, (v.shape, v.dtype, v.sharding)) for p, t, v in flat(abs_state)] == [
        (p, t, (v.shape, v.dtype, v.sharding)) for p, t, v in flat(ref_state)
    ]
    model = nnx.merge(gdef, abs_state)
    assert model.l1.kernel.get_value().sharding == NamedSharding(mesh, P("a", "b"))


@needs8
def test_as_abstract():
    mesh = make_mesh(AxisType.Auto)
    other = make_mesh(AxisType.Auto, shape=(4, 2))

    def sds(shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    tree = nnx.Dict(
        k=nnx.Param(sds((4, 8)), out_sharding=("a", "b")),
        m=nnx.Param(sds((4, 8)), out_sharding=("b", None), mesh=other),
        plain=nnx.Param(sds((3,))),
        done=nnx.Param(sds((4,)).update(sharding=NamedSharding(mesh, P("b"))), out_sharding=("a",)),
    )
    with jax.set_mesh(mesh):
        out = spmd.as_abstract(tree)
        with pytest.warns(DeprecationWarning):
            again = spmd.abstract_with_sharding(tree)
    assert out["k"].get_value().sharding.spec == P("a", "b")
    assert out["m"].get_value().sharding == NamedSharding(other, P("b", None))
    assert getattr(out["plain"].get_value(), "sharding", None) is None
    assert out["done"].get_value().sharding.spec == P("b")  # already sharded: kept
    assert tree["k"].get_value().sharding is None  # a new tree
    assert again["k"].get_value().sharding.spec == P("a", "b")


# -- the transforms.md axis-metadata cell --------------------------------------------------------
def test_axis_metadata_cell_variables_under_mesh():
    mesh = jax.make_mesh((1, 1), ("a", "b"))

    class Weights(nnx.Module):
        def __init__(self, array, sharding_names):
            self.param = nnx.Param(array, sharding_names=sharding_names)

    with jax.set_mesh(mesh):
        m = Weights(jnp.ones((3, 4, 5)), sharding_names=("a", "b", None))
    assert m.param.shape == (3, 4, 5) and m.param.sharding_names == ("a", "b", None)
    assert m.param.get_value().sharding == NamedSharding(mesh, P("a", "b", None))
    if not hasattr(nnx, "vmap"):
        return

    @nnx.vmap(in_axes=1, transform_metadata={spmd.PARTITION_NAME: "b"})
    def f(m):
        assert m.param.shape == (3, 5) and m.param.sharding_names == ("a", None)

    @nnx.vmap(out_axes=1, axis_size=4, transform_metadata={spmd.PARTITION_NAME: "b"})
    def init_vmap():
        return Weights(jnp.ones((3, 5)), sharding_names=("a", None))

    with jax.set_mesh(mesh):
        f(m)
        m2 = init_vmap()
    assert m.param.sharding_names == m2.param.sharding_names == ("a", "b", None)
    assert m2.param.shape == (3, 4, 5)


def test_no_warnings_without_mesh():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = nnx.Param(jnp.ones((2, 2)), out_sharding=("a", None))
    assert spmd.get_partition_spec(p).get_value() == P("a", None)
