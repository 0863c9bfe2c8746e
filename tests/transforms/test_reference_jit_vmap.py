"""jit / vmap / shard_map behaviours matched to the reference's transforms tests: shardings
written back, out_shardings prefixes, lower().compile(), tree-mode aliasing errors, prefix
objects' accessors, shard_map with States and graph modes, captured objects in outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from refax import nnx


def _mesh(*names):
    n = len(jax.devices())
    shape = (n,) if len(names) == 1 else (max(n // 2, 1), n // max(n // 2, 1))
    return jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), names)


class Counter(nnx.Module):
    def __init__(self):
        self.count = nnx.Variable(jnp.array(0))
        self.w = nnx.Param(jnp.ones((2, 3)))


def test_static_argnames_apply_to_positional_arguments():
    traces = []

    @nnx.jit(static_argnames=("relu",))
    def f(x, relu):
        traces.append(relu)
        return jnp.maximum(x, 0) if relu else x  # `relu` must be a Python bool here

    x = jnp.array([-1.0, 2.0])
    np.testing.assert_allclose(f(x, True), [0.0, 2.0])
    np.testing.assert_allclose(f(x, False), [-1.0, 2.0])
    assert traces == [True, False]


def test_static_argnums_apply_to_keyword_arguments():
    @nnx.jit(static_argnums=(1,))
    def f(x, relu):
        return jnp.maximum(x, 0) if relu else x

    np.testing.assert_allclose(f(jnp.array([-1.0]), relu=True), [0.0])


def test_in_shardings_are_written_back_to_the_inputs():
    mesh = _mesh("a", "b")
    spec = nnx.StateSharding(
        {
            nnx.PathContains("kernel"): NamedSharding(mesh, P("a", "b")),
            nnx.PathContains("bias"): NamedSharding(mesh, P("b")),
        }
    )
    m = nnx.Linear(16, 32, rngs=nnx.Rngs(0))

    @nnx.jit(in_shardings=(spec, None))
    def f(m, scale):
        # an update inside is laid out by the input's in_sharding on the way out
        m.kernel = jax.lax.with_sharding_constraint(m.kernel * scale, NamedSharding(mesh, P()))

    f(m, 2.0)
    assert m.kernel.sharding.spec == P("a", "b")
    assert m.bias.sharding.spec == P("b")


def test_in_shardings_inconsistent_for_a_shared_variable():
    v = nnx.Param(jnp.array(1.0))
    f = nnx.jit(lambda a, b: a[...] + b[...], in_shardings=(P(), P("x")))
    with jax.set_mesh(_mesh("x")):
        with pytest.raises(ValueError, match="Inconsistent aliasing"):
            f(v, v)


@pytest.mark.parametrize("graph", [True, False])
def test_out_shardings_object_prefix_and_tuple(graph):
    mesh = _mesh("a", "b")
    shardings = {
        nnx.PathContains("kernel"): NamedSharding(mesh, P("a", "b")),
        nnx.PathContains("bias"): NamedSharding(mesh, P("b")),
    }
    prefix = nnx.prefix(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), shardings, graph=graph)

    @nnx.jit(out_shardings=(prefix, NamedSharding(mesh, P("a"))), graph=graph, graph_updates=False)
    def make():
        return nnx.Linear(16, 32, rngs=nnx.Rngs(0)), jnp.ones((8,))

    m, y = make()
    assert m.kernel.sharding.spec == P("a", "b")
    assert m.bias.sharding.spec == P("b")
    assert y.sharding.spec == P("a")


@pytest.mark.parametrize("graph", [True, False])
def test_lower_compile_propagates_updates(graph):
    m = Counter()

    @nnx.jit(graph=graph, graph_updates=graph)
    def f(m, x):
        m.count[...] += 1
        return x @ m.w[...]

    compiled = f.lower(m, jnp.ones((1, 2))).compile()
    assert compiled.as_text() and compiled.cost_analysis() is not None
    np.testing.assert_allclose(compiled(m, jnp.ones((1, 2))), 2 * np.ones((1, 3)))
    compiled(m, jnp.ones((1, 2)))
    assert int(m.count[...]) == 2
    other = Counter()
    compiled(other, jnp.ones((1, 2)))  # another object of the same structure
    assert int(other.count[...]) == 1
    with pytest.raises(ValueError, match="differs from the arguments it was lowered with"):
        compiled(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), jnp.ones((1, 2)))


@pytest.mark.parametrize("graph", [True, False])
def test_partial_lower_compile(graph):
    m = Counter()

    def f(m, x):
        m.count[...] += 1
        return x @ m.w[...]

    bound = nnx.jit(f, graph=graph, graph_updates=False).partial(m)
    compiled = bound.lower(jnp.ones((1, 2))).compile()
    compiled(jnp.ones((1, 2)))
    np.testing.assert_allclose(bound(jnp.ones((1, 2))), 2 * np.ones((1, 3)))
    assert int(m.count[...]) == 2


def test_partial_rejects_shared_variables_in_tree_mode():
    v = nnx.Param(jnp.array(1.0))
    a, b = nnx.Dict(v=v), nnx.Dict(v=v)
    with pytest.raises(ValueError, match="Duplicate Param found at paths"):
        nnx.jit(lambda a, b, x: x, graph=False).partial(a, b)
    nnx.jit(lambda a, b, x: x, graph=True).partial(a, b)  # graph mode keeps sharing


def test_tree_mode_shared_reference_names_paths():
    v = nnx.Param(jnp.array(1.0))
    with pytest.raises(
        ValueError, match=r"(?s)Duplicate Param found at paths:.*args\[0\].*args\[1\]"
    ):
        nnx.jit(lambda a, b: None, graph=False)(v, v)
    m = nnx.Dict(a=v)
    with pytest.raises(ValueError, match=r"(?s)Duplicate Param.*args\[0\]\.a.*args\[1\]\.a"):
        nnx.vmap(lambda a, b: None, in_axes=None, axis_size=2, graph=False)(m, m)


def test_tree_mode_rejects_returning_an_input_variable():
    v = nnx.Param(jnp.array(1.0))
    with pytest.raises(ValueError, match="does not support Variable aliasing"):
        nnx.jit(lambda v: v, graph=False)(v)
    with pytest.raises(ValueError, match="does not support Variable aliasing"):
        nnx.vmap(lambda v: v, in_axes=None, out_axes=None, axis_size=2, graph=False)(v)
    # a new Variable is fine, and graph mode returns the very input
    out = nnx.jit(lambda v: nnx.Param(v[...] + 1), graph=False)(v)
    np.testing.assert_allclose(out[...], 2.0)
    assert nnx.jit(lambda v: v)(v) is v


def test_prefix_accessors():
    axes = nnx.StateAxes({nnx.Param: 0, ...: None})
    assert axes.axes == (0, None) and axes.filters == (nnx.Param, ...)
    assert axes.map_prefix(("a",), nnx.Param(1)) == 0
    assert axes.map_prefix(("a",), nnx.BatchStat(1)) is None
    assert axes.get(nnx.Param) == 0 and list(axes.keys()) == [nnx.Param, ...]
    sharding = nnx.StateSharding({nnx.Param: P("x"), ...: P()})
    assert sharding.shardings == (P("x"), P())
    diff = nnx.DiffState(0, nnx.Param)
    assert diff.map_prefix(("a",), nnx.Param(1)) is True
    assert diff.map_prefix(("a",), nnx.BatchStat(1)) is False


def test_state_axes_and_sharding_from_a_state():
    class Model(nnx.Module):
        def __init__(self):
            self.linear = nnx.Linear(2, 3, rngs=nnx.Rngs(0))

    state = nnx.state(Model())
    state["linear"]["kernel"] = 0
    state["linear"]["bias"] = None
    axes = nnx.StateAxes(state)
    assert axes.map_prefix(("linear", "kernel"), None) == 0
    assert axes.map_prefix(("linear", "bias"), None) is None

    model = nnx.vmap(Model, in_axes=(), out_axes=axes, axis_size=4)()
    assert model.linear.kernel.shape == (4, 2, 3) and model.linear.bias.shape == (3,)


def test_shard_map_writes_in_specs_back_and_takes_states():
    mesh = _mesh("a")
    n = len(jax.devices())
    m = nnx.Linear(16, 8 * n, rngs=nnx.Rngs(0))
    specs = nnx.StateSharding(nnx.State({"kernel": P(None, "a"), "bias": P()}))
    shapes = []

    @nnx.shard_map(mesh=mesh, in_specs=(specs,), out_specs=None)
    def f(m):
        shapes.append((m.kernel.shape, m.bias.shape))

    f(m)
    assert shapes == [((16, 8), (8 * n,))]
    assert isinstance(m.kernel.sharding, NamedSharding)
    assert m.kernel.sharding.spec == P(None, "a")

    graphdef, state = nnx.split(nnx.Linear(16, 8 * n, rngs=nnx.Rngs(0)))

    @nnx.shard_map(
        mesh=mesh,
        in_specs=(nnx.State({"kernel": P(None, "a"), "bias": P()}),),
        out_specs=None,
        graph_updates=False,
    )
    def g(s):
        shapes.append((s["kernel"].shape, s["bias"].shape))

    g(state)
    assert shapes[-1] == ((16, 8), (8 * n,))


def test_shard_map_tree_mode_rejects_sharing():
    v = nnx.Param(jnp.array(1.0))
    f = nnx.shard_map(
        lambda a, b: None, mesh=_mesh("a"), in_specs=(P(), P()), out_specs=None, graph=False
    )
    with pytest.raises(ValueError, match="Duplicate Param"):
        f(nnx.Dict(v=v), nnx.Dict(v=v))


@pytest.mark.parametrize("updates", [True, False])
def test_vmap_rejects_returning_a_captured_object(updates):
    m = Counter()
    f = nnx.vmap(lambda x: m, graph_updates=updates)
    match = "different trace level" if updates else "Cannot return captured Variable"
    with pytest.raises(ValueError, match=match):
        f(jnp.zeros((4,)))
    # made inside: fine
    out = nnx.vmap(lambda x: Counter(), graph_updates=updates)(jnp.zeros((4,)))
    assert out.w.shape == (4, 2, 3)
