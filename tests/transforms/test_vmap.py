"""nnx.vmap: prefixes over objects, StateAxes, vectorised init, graph updates, aliasing,
transform_metadata, and agreement with the oracle flax.nnx.vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import random

import refax as nnx


class Count(nnx.Variable):
    pass


class Weights(nnx.Module):
    def __init__(self, kernel, bias, count=None):
        self.kernel, self.bias = nnx.Param(kernel), nnx.Param(bias)
        if count is not None:
            self.count = Count(count)


def _weights(count=None, n=10):
    return Weights(random.uniform(random.key(0), (n, 2, 3)), jnp.zeros((n, 3)), count)


def _vector_dot(w, x):
    assert w.kernel.ndim == 2 and x.ndim == 1, "batch dimensions not allowed"
    return x @ w.kernel + w.bias


def _leaves(lib, obj):
    return {
        ".".join(map(str, p)): np.asarray(
            jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v
        )
        for p, v in jax.tree_util.tree_leaves_with_path(lib.to_pure_dict(lib.state(obj)))
    }


def _assert_same(ours, theirs):
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, atol=1e-6, err_msg=k)


# -- prefixes --------------------------------------------------------------------------------
@pytest.mark.parametrize("in_axes", [0, (0, 0), [0, 0]])
def test_object_takes_axis_like_a_pytree(in_axes):
    w, x = _weights(), random.normal(random.key(1), (10, 2))
    y = nnx.vmap(_vector_dot, in_axes=in_axes, out_axes=1)(w, x)
    expected = jnp.einsum("bi,bij->jb", x, w.kernel.value) + w.bias.value.T
    np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_prefix_over_containers_of_objects():
    shared = Weights(jnp.ones((2, 3)), jnp.zeros((3,)))  # broadcast
    stacked = _weights(n=4)
    x = jnp.arange(8.0).reshape(4, 2)

    def f(d, xs):
        return xs[0] @ d["batched"].kernel + xs[0] @ d["shared"].kernel + xs[1]

    y = nnx.vmap(f, in_axes=({"batched": 0, "shared": None}, [0, None]))(
        {"batched": stacked, "shared": shared}, [x, jnp.ones(3)]
    )
    expected = jnp.einsum("bi,bij->bj", x, stacked.kernel.value) + x @ shared.kernel.value + 1
    np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_keyword_arguments_map_over_axis_0():
    y = nnx.vmap(lambda a, b: a * b)(jnp.arange(3.0), b=jnp.arange(3.0))
    np.testing.assert_allclose(y, jnp.arange(3.0) ** 2)


def test_broadcast_object_none_and_axis_size():
    w = Weights(jnp.ones((2, 3)), jnp.arange(3.0))
    y = nnx.vmap(lambda w: w.bias * 2, in_axes=None, axis_size=5)(w)
    assert y.shape == (5, 3)
    lin = nnx.vmap(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0)), axis_size=4)()
    assert lin.kernel.shape == (4, 2, 3)
    np.testing.assert_allclose(lin.kernel.value[0], lin.kernel.value[3])  # same seed per lane


def test_axis_name_with_psum_over_object_state():
    w = _weights(n=4)

    @nnx.vmap(in_axes=(0, None), axis_name="batch")
    def total(w, x):
        return jax.lax.psum(x @ w.kernel, "batch")

    y = total(w, jnp.ones(2))
    assert y.shape == (4, 3)
    np.testing.assert_allclose(y[0], jnp.ones(2) @ w.kernel.value.sum(0), rtol=1e-5)
    np.testing.assert_allclose(y[0], y[3])


def test_bad_prefixes_raise_clear_errors():
    w = _weights(n=4)
    with pytest.raises(ValueError, match="in_axes has 1 entries"):
        nnx.vmap(lambda a, b: a, in_axes=(0,))(w, w)
    with pytest.raises(ValueError, match="StateAxes can only be used directly on an object"):
        nnx.vmap(lambda d: 0.0, in_axes=(nnx.StateAxes({...: 0}),))({"a": jnp.ones(3)})
    with pytest.raises(ValueError, match="an object can only take an int, None or nnx.StateAxes"):
        nnx.vmap(lambda w: 0.0, in_axes=(nnx.StateSharding({...: 0}),))(w)
    with pytest.raises(ValueError, match="no filter matches"):
        nnx.vmap(lambda w: 0.0, in_axes=(nnx.StateAxes({Count: 0}),))(w)
    with pytest.raises(ValueError, match="bound to a Linear"):
        nnx.vmap(nnx.Linear(1, 1, rngs=nnx.Rngs(0)).__call__)


# -- state propagation and StateAxes -----------------------------------------------------------
def test_stateful_updates_propagate():
    w = _weights(count=jnp.arange(10))

    def stateful_vector_dot(w, x):
        w.count += 1
        return _vector_dot(w, x)

    y = nnx.vmap(stateful_vector_dot, in_axes=0, out_axes=1)(w, jnp.ones((10, 2)))
    assert y.shape == (3, 10)
    np.testing.assert_array_equal(w.count.value, jnp.arange(1, 11))


def test_state_axes_broadcast_count():
    w = Weights(random.uniform(random.key(0), (10, 2, 3)), jnp.zeros((10, 3)), jnp.array(0))

    def f(w, x):
        w.count += 1
        return _vector_dot(w, x)

    state_axes = nnx.StateAxes({nnx.Param: 0, Count: None})
    y = nnx.vmap(f, in_axes=(state_axes, 0), out_axes=1)(w, jnp.ones((10, 2)))
    assert y.shape == (3, 10)
    assert w.count.value.shape == () and int(w.count.value) == 1


def test_input_object_returned_keeps_identity_and_axes():
    w = _weights(n=4)
    out, y = nnx.vmap(lambda w: (w, w.bias + 1), in_axes=0, out_axes=0)(w)
    assert out is w
    np.testing.assert_allclose(y, w.bias.value + 1)


def _bn_model(lib):
    class Model(lib.Module):
        def __init__(self, rngs):
            self.linear = lib.Linear(3, 4, rngs=rngs)
            self.bn = lib.BatchNorm(4, use_running_average=False, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.linear(x))

    return Model


def _broadcast_params_batched_batch_stats(lib):
    Model = _bn_model(lib)
    axes = lib.StateAxes({lib.BatchStat: 0, ...: None})
    model = lib.vmap(lambda: Model(lib.Rngs(0)), out_axes=axes, axis_size=2)()
    assert model.linear.kernel.shape == (3, 4) and model.bn.mean.shape == (2, 4)
    x = jnp.linspace(-1, 2, 2 * 5 * 3).reshape(2, 5, 3)
    y = lib.vmap(lambda m, x: m(x), in_axes=(axes, 0))(model, x)
    assert y.shape == (2, 5, 4)
    assert not np.allclose(model.bn.mean[...][0], model.bn.mean[...][1])
    return _leaves(lib, model), np.asarray(y)


def test_broadcast_params_batched_batch_stats():
    """Shared Params, one set of BatchNorm statistics per lane; the oracle agrees."""
    ours, y = _broadcast_params_batched_batch_stats(nnx)
    fnnx = pytest.importorskip("flax.nnx")
    theirs, y_ref = _broadcast_params_batched_batch_stats(fnnx)
    _assert_same(ours, theirs)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)


# -- objects created inside ------------------------------------------------------------------
@pytest.mark.parametrize("out_axes", [0, 1])
def test_vectorised_init_matches_oracle(out_axes):
    fnnx = pytest.importorskip("flax.nnx")

    def build(lib):
        def create_model(key):
            rngs = lib.Rngs(params=key)
            return lib.Sequential(lib.Linear(2, 4, rngs=rngs), lib.Linear(4, 3, rngs=rngs))

        keys = random.split(random.key(7), 3)
        return lib.vmap(create_model, out_axes=out_axes)(keys)

    ours, theirs = build(nnx), build(fnnx)
    assert ours.layers[0].kernel.shape == ((3, 2, 4) if out_axes == 0 else (2, 3, 4))
    _assert_same(_leaves(nnx, ours), _leaves(fnnx, theirs))


def test_vmap_decorates_init_and_call_weight_stack():
    class WeightStack(nnx.Module):
        @nnx.vmap
        def __init__(self, seed):
            self.kernel = nnx.Param(random.uniform(random.key(seed), (2, 3)))
            self.bias = nnx.Param(jnp.zeros((3,)))

        @nnx.vmap(in_axes=0, out_axes=1)
        def __call__(self, x):
            assert self.kernel.ndim == 2 and x.ndim == 1
            return x @ self.kernel + self.bias

    weights = WeightStack(jnp.arange(10))
    assert weights.kernel.shape == (10, 2, 3)
    np.testing.assert_allclose(weights.kernel.value[3], random.uniform(random.key(3), (2, 3)))
    y = weights(random.normal(random.key(1), (10, 2)))
    assert y.shape == (3, 10)


# -- graph updates ---------------------------------------------------------------------------
def test_graph_updates_crazy_vector_dot():
    w = _weights(count=jnp.arange(10))
    kernel = w.kernel

    def crazy_vector_dot(w, x):
        w.count += 1
        y = x @ w.kernel + w.bias
        w.some_property = ["a", 2, False]  # add attribute
        del w.bias  # delete attribute
        w.new_param = w.kernel  # share reference
        return y

    y = nnx.vmap(crazy_vector_dot, in_axes=0, out_axes=1)(w, jnp.ones((10, 2)))
    assert y.shape == (3, 10)
    assert not hasattr(w, "bias")
    assert w.some_property == ["a", 2, False]
    assert w.new_param is w.kernel is kernel
    np.testing.assert_array_equal(w.count.value, jnp.arange(1, 11))


def test_new_variable_added_inside_is_stacked():
    w = _weights(n=4)

    def f(w):
        w.extra = nnx.Param(w.bias.value.sum())

    nnx.vmap(f)(w)
    assert w.extra.shape == (4,)


# -- consistent aliasing ---------------------------------------------------------------------
_ALIAS_MESSAGE = (
    "Inconsistent aliasing detected. The following nodes have different prefixes:\n"
    "Node: Param\n  param: 0\n  param: 0\n  param: 1"
)


class _Single(nnx.Module):
    def __init__(self, array):
        self.param = nnx.Param(array)


def test_inconsistent_aliasing_between_inputs_exact_message():
    m = _Single(jnp.arange(10))
    arg1 = {"a": {"b": m}, "c": m}
    arg2 = [(m, m), m]
    with pytest.raises(ValueError) as info:
        nnx.vmap(lambda a, b: None, in_axes=(0, 1))(arg1, arg2)
    assert str(info.value) == _ALIAS_MESSAGE


def test_inconsistent_aliasing_between_input_and_output_exact_message():
    m = _Single(jnp.arange(10))
    arg1 = {"a": {"b": m}, "c": m}
    with pytest.raises(ValueError) as info:
        nnx.vmap(lambda a: a, in_axes=0, out_axes=1)(arg1)
    assert str(info.value) == _ALIAS_MESSAGE


def test_aliasing_of_a_returned_submodule_is_checked():
    outer = nnx.Dict(inner=_Single(jnp.ones((4, 2))))
    with pytest.raises(ValueError, match="Inconsistent aliasing"):
        nnx.vmap(lambda o: o["inner"], in_axes=0, out_axes=1)(outer)
    same = nnx.vmap(lambda o: o["inner"], in_axes=0, out_axes=0)(outer)
    assert same is outer["inner"]


def test_aliasing_consistent_state_axes_are_accepted():
    m = _Single(jnp.arange(4.0))
    axes = nnx.StateAxes({nnx.Param: 0})
    y = nnx.vmap(lambda a, b: a.param + b.param, in_axes=(axes, 0))(m, m)
    np.testing.assert_allclose(y, 2 * jnp.arange(4.0))


# -- transform_metadata ----------------------------------------------------------------------
class _Sharded(nnx.Module):
    def __init__(self, array, sharding_names):
        self.param = nnx.Param(array, sharding_names=sharding_names)


def test_transform_metadata_partition_name_inside_and_outside():
    mesh = jax.make_mesh((1, 1), ("a", "b"))
    seen = {}

    @nnx.vmap(in_axes=1, transform_metadata={nnx.PARTITION_NAME: "b"})
    def f(m):
        seen["shape"], seen["names"] = m.param.shape, m.param.sharding_names

    with jax.set_mesh(mesh):
        m = _Sharded(jnp.ones((3, 4, 5)), sharding_names=("a", "b", None))
        f(m)
    assert seen == {"shape": (3, 5), "names": ("a", None)}
    assert m.param.shape == (3, 4, 5) and m.param.sharding_names == ("a", "b", None)


@pytest.mark.parametrize("out_axes, names", [(1, ("a", "b", None)), (0, ("b", "a", None))])
def test_transform_metadata_objects_created_inside(out_axes, names):
    mesh = jax.make_mesh((1, 1), ("a", "b"))

    @nnx.vmap(out_axes=out_axes, axis_size=4, transform_metadata={nnx.PARTITION_NAME: "b"})
    def init():
        return _Sharded(jnp.ones((3, 5)), sharding_names=("a", None))

    with jax.set_mesh(mesh):
        m = init()
    assert m.param.sharding_names == names
    assert m.param.shape == ((3, 4, 5) if out_axes == 1 else (4, 3, 5))


# -- composition and the oracle --------------------------------------------------------------
def test_vmap_composes_with_jit_and_itself():
    w = _weights(n=4)
    inner = nnx.vmap(lambda w, x: x @ w.kernel, in_axes=(None, 0))
    outer = nnx.jit(nnx.vmap(inner, in_axes=(0, None)))
    y = outer(w, jnp.ones((5, 2)))
    assert y.shape == (4, 5, 3)
    np.testing.assert_allclose(y[2, 1], jnp.ones(2) @ w.kernel.value[2], rtol=1e-6)


def test_stateful_forward_matches_oracle():
    fnnx = pytest.importorskip("flax.nnx")

    def run(lib):
        Model = _bn_model(lib)
        keys = random.split(random.key(3), 3)
        model = lib.vmap(lambda k: Model(lib.Rngs(params=k)))(keys)
        x = jnp.linspace(-2, 2, 3 * 6 * 3).reshape(3, 6, 3)
        y = lib.vmap(lambda m, x: m(x))(model, x)
        y = lib.vmap(lambda m, x: m(x))(model, x * 2)
        return _leaves(lib, model), np.asarray(y)

    (ours, y1), (theirs, y2) = run(nnx), run(fnnx)
    _assert_same(ours, theirs)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)
