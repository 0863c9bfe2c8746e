"""nnx.scan: Carry positions, length/reverse/unroll, StateAxes, scan over a vmap-created stack
of layers (basics.md), remat inside scan, clear errors, and agreement with flax.nnx.scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refax as nnx

try:
    from refax import remat
except ImportError:  # not exported yet
    try:
        from refax._transforms._remat import remat
    except ImportError:
        remat = None


class Count(nnx.Variable):
    pass


def _leaves(lib, obj):
    return {
        ".".join(map(str, p)): np.asarray(
            jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v
        )
        for p, v in jax.tree_util.tree_leaves_with_path(lib.to_pure_dict(lib.state(obj)))
    }


def _assert_same(ours, theirs, rtol=1e-5, atol=1e-6):
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=rtol, atol=atol, err_msg=k)


def _ref_scan(f, init, xs, **kw):
    return jax.lax.scan(f, init, xs, **kw)


XS = jnp.arange(12.0).reshape(4, 3)


# -- Carry positions and scan options --------------------------------------------------------
def test_carry_first_default_axes():
    f = lambda c, x: (c + x, c * x)  # noqa: E731
    c, ys = nnx.scan(f)(jnp.ones(3), XS)
    rc, rys = _ref_scan(f, jnp.ones(3), XS)
    np.testing.assert_allclose(c, rc)
    np.testing.assert_allclose(ys, rys)


def test_carry_last_and_single_carry_output():
    f = nnx.scan(lambda x, c: c * 2 + x, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    rc, _ = _ref_scan(lambda c, x: (c * 2 + x, None), jnp.zeros(3), XS)
    np.testing.assert_allclose(f(XS, jnp.zeros(3)), rc)


def test_carry_in_the_middle_with_broadcast_and_tuple_outputs():
    @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=(0, nnx.Carry))
    def f(x, c, scale):
        return jnp.sum(x) * scale, c + x * scale

    ys, c = f(XS, jnp.zeros(3), 2.0)
    np.testing.assert_allclose(ys, XS.sum(1) * 2)
    np.testing.assert_allclose(c, XS.sum(0) * 2)


def test_pytree_carry_and_scanned_axis_1():
    @nnx.scan(in_axes=(nnx.Carry, 1), out_axes=(nnx.Carry, 1))
    def f(c, x):
        return {"s": c["s"] + x}, x * 2

    c, ys = f({"s": jnp.zeros(4)}, XS)  # scans the 3 columns
    np.testing.assert_allclose(c["s"], XS.sum(1))
    np.testing.assert_allclose(ys, XS * 2)


@pytest.mark.parametrize("reverse, unroll", [(False, 1), (True, 1), (True, 2), (False, True)])
def test_length_reverse_unroll_match_lax_scan(reverse, unroll):
    f = lambda c, x: (c * 0.5 + x, c.sum() + x.sum())  # noqa: E731
    ours = nnx.scan(f, reverse=reverse, unroll=unroll)(jnp.ones(3), XS)
    ref = _ref_scan(f, jnp.ones(3), XS, reverse=reverse, unroll=unroll)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_length_without_scanned_inputs():
    @nnx.scan(in_axes=nnx.Carry, out_axes=(nnx.Carry, 0), length=5)
    def f(c):
        return c + 1, c

    c, ys = f(jnp.zeros(()))
    assert int(c) == 5
    np.testing.assert_allclose(ys, jnp.arange(5.0))


# -- objects ---------------------------------------------------------------------------------
class Acc(nnx.Module):
    def __init__(self):
        self.total = Count(jnp.zeros(3))
        self.steps = Count(jnp.array(0))


def test_object_carry_updates_and_identity():
    acc = Acc()

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def f(acc, x):
        acc.total += x
        acc.steps += 1
        return acc, acc.total.value.sum()

    out, ys = f(acc, XS)
    assert out is acc
    np.testing.assert_allclose(acc.total.value, XS.sum(0))
    assert int(acc.steps.value) == 4
    np.testing.assert_allclose(ys, jnp.cumsum(XS.sum(1)))


def test_state_axes_scan_some_variables_carry_others():
    class Layered(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.arange(12.0).reshape(4, 3))  # one row per step
            self.count = Count(jnp.array(0))

    m = Layered()
    axes = nnx.StateAxes({Count: nnx.Carry, ...: 0})

    @nnx.scan(in_axes=(axes, nnx.Carry), out_axes=nnx.Carry)
    def f(m, x):
        m.count += 1
        return x * m.w

    y = f(m, jnp.ones(3))
    np.testing.assert_allclose(y, jnp.prod(m.w.value, axis=0))
    assert int(m.count.value) == 4 and m.w.shape == (4, 3)


def test_scanned_object_state_comes_back_stacked():
    m = nnx.Dict(w=nnx.Param(jnp.zeros((4, 3))))

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def f(m, c):
        m["w"].value = m["w"].value + c
        return c + 1

    f(m, jnp.zeros(3))
    np.testing.assert_allclose(m["w"].value, jnp.arange(4.0)[:, None] * jnp.ones(3))


def _mlp_cls(lib):
    class MLP(lib.Module):
        def __init__(self, din, dmid, dout, *, rngs):
            self.linear1 = lib.Linear(din, dmid, rngs=rngs)
            self.dropout = lib.Dropout(rate=0.1, rngs=rngs)
            self.bn = lib.BatchNorm(dmid, rngs=rngs)
            self.linear2 = lib.Linear(dmid, dout, rngs=rngs)

        def __call__(self, x, rngs=None):
            x = jax.nn.gelu(self.dropout(self.bn(self.linear1(x)), rngs=rngs))
            return self.linear2(x)

    return MLP


def _scan_over_layers(lib, rematerialise=False):
    MLP = _mlp_cls(lib)

    @lib.vmap(in_axes=0, out_axes=0)
    def create_model(rngs):
        return MLP(6, 8, 6, rngs=rngs)

    def step(model, rngs, x):
        return model(x, rngs)

    if rematerialise:
        step = remat(step)
    forward = lib.scan(step, in_axes=(0, 0, lib.Carry), out_axes=lib.Carry)
    model = create_model(lib.Rngs(0).split(5))
    x = jnp.linspace(-1, 1, 3 * 6).reshape(3, 6)
    y = forward(model, lib.Rngs(1).split(5), x)
    y = forward(model, lib.Rngs(2).split(5), y)
    return model, np.asarray(y)


def test_scan_over_layers_batch_stats_propagate_and_match_oracle():
    model, y = _scan_over_layers(nnx)
    assert y.shape == (3, 6)
    assert model.bn.mean.shape == (5, 8)
    assert not np.allclose(model.bn.mean.value, 0)  # running stats updated per layer
    assert not np.allclose(model.bn.mean.value[0], model.bn.mean.value[1])
    fnnx = pytest.importorskip("flax.nnx")
    ref_model, ref_y = _scan_over_layers(fnnx)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    _assert_same(_leaves(nnx, model), _leaves(fnnx, ref_model))


@pytest.mark.skipif(remat is None, reason="refax.remat not available")
def test_remat_inside_scan_same_values_and_gradients():
    model, y = _scan_over_layers(nnx, rematerialise=True)
    ref_model, ref_y = _scan_over_layers(nnx)
    np.testing.assert_allclose(y, ref_y, rtol=1e-6)
    _assert_same(_leaves(nnx, model), _leaves(nnx, ref_model))

    def loss(m, x, checkpointed):
        step = lambda layer, x: jnp.tanh(layer(x))  # noqa: E731
        step = remat(step) if checkpointed else step
        return jnp.sum(nnx.scan(step, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(m, x) ** 2)

    layers = nnx.vmap(lambda r: nnx.Linear(3, 3, rngs=r))(nnx.Rngs(0).split(3))
    x = jnp.ones((2, 3))
    g1 = nnx.grad(loss)(layers, x, True)
    g2 = nnx.grad(loss)(layers, x, False)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_scan_composes_with_jit_and_grad():
    layers = nnx.vmap(lambda r: nnx.Linear(3, 3, rngs=r))(nnx.Rngs(0).split(4))
    forward = nnx.scan(lambda l, x: jnp.tanh(l(x)), in_axes=(0, nnx.Carry), out_axes=nnx.Carry)

    @nnx.jit
    def loss_and_grad(layers, x):
        return nnx.value_and_grad(lambda m: jnp.sum(forward(m, x) ** 2))(layers)

    loss, grads = loss_and_grad(layers, jnp.ones((2, 3)))
    assert grads["kernel"].value.shape == (4, 3, 3)
    ref = jnp.ones((2, 3))
    for i in range(4):
        ref = jnp.tanh(ref @ layers.kernel.value[i] + layers.bias.value[i])
    np.testing.assert_allclose(loss, jnp.sum(ref**2), rtol=1e-5)


def test_transform_metadata_removes_the_scanned_axis_inside():
    class Stack(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((4, 3)), sharding_names=("layers", "model"))

    seen = []

    @nnx.scan(
        in_axes=(0, nnx.Carry),
        out_axes=nnx.Carry,
        transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    def f(m, c):
        seen.append(m.w.sharding_names)
        return c + m.w.value

    s = Stack()
    f(s, jnp.zeros(3))
    assert seen == [("model",)]
    assert s.w.sharding_names == ("layers", "model")


# -- errors ----------------------------------------------------------------------------------
def test_variable_added_to_a_scanned_input_is_stacked():
    # lazy initialisation inside the body: the new Variable gets the input's scan axis
    m = nnx.Dict(w=nnx.Param(jnp.ones((4, 3))))

    def add_attr(m, c):
        m["new"] = nnx.Param(m["w"][...].sum() + c.sum())
        return c + 1

    c = nnx.scan(add_attr, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(m, jnp.zeros(3))
    np.testing.assert_allclose(c, [4, 4, 4])
    assert isinstance(m["new"], nnx.Param)
    np.testing.assert_allclose(m["new"][...], [3, 6, 9, 12])  # one per step, stacked


def test_structure_change_inside_scan_is_an_error():
    def remove_attr(m, c):
        del m["w"]
        return c

    m = nnx.Dict(w=nnx.Param(jnp.ones((4, 3))), v=nnx.Param(jnp.ones((4, 3))))
    with pytest.raises(ValueError, match="removed or re-shared"):
        nnx.scan(remove_attr, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(m, jnp.ones(3))
    assert "w" in m

    def add_attr(m, c):
        m["new"] = nnx.Param(jnp.zeros(()))
        return m, c

    carried = nnx.Dict(w=nnx.Param(jnp.ones(3)))
    with pytest.raises(ValueError, match="Carry references must be the same"):
        nnx.scan(add_attr, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(
            carried, jnp.ones((4, 3))
        )
    assert "new" not in carried


def test_mismatched_carry_errors():
    x = jnp.ones(3)
    with pytest.raises(ValueError, match="Found multiple Carry definitions in out_axes"):
        nnx.scan(lambda c, x: (c, c), out_axes=(nnx.Carry, nnx.Carry))
    with pytest.raises(ValueError, match="the other must also have Carry"):
        nnx.scan(lambda c, x: c, in_axes=(nnx.Carry, 0), out_axes=0)
    with pytest.raises(ValueError, match="exactly one argument"):
        nnx.scan(lambda c: c, in_axes=nnx.Carry, out_axes=nnx.Carry, length=3)(x, XS)
    with pytest.raises(ValueError, match="carry output must have the same structure"):
        nnx.scan(lambda c, x: ((c[0],), x))((x, x), XS)
    with pytest.raises(TypeError, match="carry"):  # JAX: carry types differ
        nnx.scan(lambda c, x: (jnp.ones(4), x))(x, XS)
    with pytest.raises(ValueError, match="Cannot broadcast output state"):
        nnx.scan(lambda c, x: (c, x), out_axes=(nnx.Carry, None))


def test_returned_input_object_must_keep_its_axis():
    m = nnx.Dict(w=nnx.Param(jnp.ones((4, 3))))
    with pytest.raises(ValueError, match="Inconsistent aliasing"):
        nnx.scan(lambda m, c: (c, m), in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 1))(
            m, jnp.ones(3)
        )


# -- the oracle ------------------------------------------------------------------------------
def test_stateful_scan_with_state_axes_matches_oracle():
    fnnx = pytest.importorskip("flax.nnx")

    def run(lib):
        class Block(lib.Module):
            def __init__(self, rngs):
                self.lin = lib.Linear(3, 3, rngs=rngs)
                self.bn = lib.BatchNorm(3, rngs=rngs)

            def __call__(self, x):
                return jax.nn.relu(self.bn(self.lin(x)))

        @lib.split_rngs(splits=4)
        @lib.vmap(in_axes=0, out_axes=0)
        def create(rngs):
            return Block(rngs)

        blocks = create(lib.Rngs(0))
        x = jnp.linspace(-1, 1, 6).reshape(2, 3)

        @lib.scan(in_axes=(0, lib.Carry, 0), out_axes=(0, lib.Carry), reverse=True)
        def fwd(b, x, s):
            y = b(x) * s
            return jnp.mean(y), y

        ys, y = fwd(blocks, x, jnp.arange(1.0, 5.0))
        return _leaves(lib, blocks), np.asarray(ys), np.asarray(y)

    (ours, ys1, y1), (theirs, ys2, y2) = run(nnx), run(fnnx)
    _assert_same(ours, theirs)
    np.testing.assert_allclose(ys1, ys2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)
