"""Sequential, and the layers together: the MLP of the basics guide against the oracle."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as F

from refax import nnx
from refax._rngs import Rngs
from refax.nn import BatchNorm, Dropout, Linear, Sequential, gelu, relu

# The names the basics guide uses, taken from refax.
R = types.SimpleNamespace(
    Module=nnx.Module, Param=nnx.Param, Rngs=Rngs, Dropout=Dropout, BatchNorm=BatchNorm, gelu=gelu
)


# -- Sequential -----------------------------------------------------------------------------------
def test_sequential_matches_composition_and_oracle():
    mine = Sequential(Linear(3, 8, rngs=Rngs(0)), relu, Linear(8, 2, rngs=Rngs(1)))
    ref = F.Sequential(F.Linear(3, 8, rngs=F.Rngs(0)), F.relu, F.Linear(8, 2, rngs=F.Rngs(1)))
    x = jax.random.normal(jax.random.key(0), (4, 3))
    y = mine(x)
    np.testing.assert_allclose(y, mine.layers[2](relu(mine.layers[0](x))), rtol=1e-6)
    np.testing.assert_allclose(y, ref(x), rtol=1e-6)
    assert len(jax.tree.leaves(nnx.state(mine))) == 4  # both Linear layers are in the graph


def test_sequential_unpacks_tuples_and_dicts_and_passes_rngs():
    seq = Sequential(lambda x: (x, x + 1), lambda a, b: {"a": a, "b": b}, lambda a, b: a * b)
    assert seq(3) == 12
    seq = Sequential(lambda x, *, scale: x * scale, lambda y: y + 1)
    assert seq(2, scale=5) == 11
    dropout = Dropout(0.5)
    seq = Sequential(dropout, lambda y: y * 1.0)
    x = jnp.ones((4, 4))
    y = seq(x, rngs=Rngs(dropout=0))
    np.testing.assert_array_equal(y, Dropout(0.5)(x, rngs=Rngs(dropout=0)))


def test_empty_sequential_like_oracle():
    for args, kwargs in [((1,), {}), ((1, 2), {}), ((), {"x": 1}), ((), {})]:
        assert Sequential()(*args, **kwargs) == F.Sequential()(*args, **kwargs)


def test_sequential_rejects_non_callables():
    with pytest.raises(TypeError, match="Sequential: layer 1 is not callable"):
        Sequential(relu, 3)(jnp.ones(2))


def test_sequential_modes_reach_children():
    seq = Sequential(Linear(2, 4, rngs=Rngs(0)), BatchNorm(4, rngs=Rngs(0)), Dropout(0.5))
    seq.eval()
    assert seq.layers[1].use_running_average and seq.layers[2].deterministic
    seq.train()
    assert not seq.layers[1].use_running_average and not seq.layers[2].deterministic


# -- the basics guide ---------------------------------------------------------------------------
def define(lib):
    """The guide's ``Linear``, ``MLP`` and ``LoraLinear`` written against namespace ``lib``."""

    class GuideLinear(lib.Module):
        def __init__(self, din, dout, *, rngs):
            self.w = lib.Param(rngs.params.uniform((din, dout)))
            self.b = lib.Param(jnp.zeros((dout,)))
            self.din, self.dout = din, dout

        def __call__(self, x):
            return x @ self.w + self.b[None]

    class MLP(lib.Module):
        def __init__(self, din, dmid, dout, *, rngs):
            self.linear1 = GuideLinear(din, dmid, rngs=rngs)
            self.dropout = lib.Dropout(rate=0.1)
            self.bn = lib.BatchNorm(dmid, rngs=rngs)
            self.linear2 = GuideLinear(dmid, dout, rngs=rngs)

        def __call__(self, x, rngs):
            x = lib.gelu(self.dropout(self.bn(self.linear1(x)), rngs=rngs))
            return self.linear2(x)

    class LoraLinear(lib.Module):
        def __init__(self, linear, rank, rngs):
            self.linear = linear
            self.A = lib.Param(rngs.normal((linear.din, rank)))
            self.B = lib.Param(rngs.normal((rank, linear.dout)))

        def __call__(self, x):
            return self.linear(x) + x @ self.A @ self.B

    return GuideLinear, MLP, LoraLinear


def test_guide_linear_recorded_output():
    GuideLinear, _, _ = define(R)
    y = GuideLinear(2, 5, rngs=Rngs(params=0))(x=jnp.ones((1, 2)))
    expected = [[1.5643291, 0.94782424, 0.37971854, 1.0724319, 0.22112393]]
    np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_guide_mlp_matches_oracle():
    _, MLP, _ = define(R)
    _, RefMLP, _ = define(F)
    mine, ref = MLP(2, 16, 5, rngs=Rngs(0)), RefMLP(2, 16, 5, rngs=F.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (3, 2))
    y, y_ref = mine(x, rngs=Rngs(1)), ref(x, rngs=F.Rngs(1))
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mine.bn.mean[...], ref.bn.mean[...], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mine.bn.var[...], ref.bn.var[...], rtol=1e-6)
    mine.eval()
    ref.eval()
    np.testing.assert_allclose(mine(x, rngs=None), ref(x, rngs=None), rtol=1e-6, atol=1e-6)


def test_guide_model_surgery_matches_oracle():
    _, MLP, LoraLinear = define(R)
    _, RefMLP, RefLoraLinear = define(F)
    outs = []
    for lib, mlp, lora in ((R, MLP, LoraLinear), (F, RefMLP, RefLoraLinear)):
        rngs = lib.Rngs(0)
        model = mlp(2, 32, 5, rngs=rngs)
        model.linear1 = lora(model.linear1, 4, rngs=rngs)
        model.linear2 = lora(model.linear2, 4, rngs=rngs)
        outs.append(model(x=jnp.ones((3, 2)), rngs=rngs))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_guide_mlp_functional_training_step():
    """One SGD step through split/merge under jax.jit, same numbers as the oracle."""
    _, MLP, _ = define(R)
    _, RefMLP, _ = define(F)
    x, target = jnp.ones((5, 2)), jnp.ones((5, 10))
    losses = []
    for lib, mlp in ((nnx, MLP), (F, RefMLP)):
        rngs_cls = Rngs if lib is nnx else F.Rngs
        model = mlp(2, 16, 10, rngs=rngs_cls(0))
        graphdef, params, rest = lib.split(model, lib.Param, ...)

        @jax.jit
        def step(params, rest, graphdef=graphdef, lib=lib, rngs_cls=rngs_cls):
            def loss_fn(params, rest):
                m = lib.merge(graphdef, params, rest)
                loss = jnp.mean((m(x, rngs_cls(1)) - target) ** 2)
                return loss, lib.state(m, lib.BatchStat)

            # Both arguments traced, so the BatchStat updates happen at the grad trace level.
            grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
            (loss, new_rest), (g, _) = grad_fn(params, rest)
            params = jax.tree.map(lambda p, d: p - 0.1 * d, params, g)
            return loss, params, new_rest

        loss, params, new_rest = step(params, rest)
        loss2, _, _ = step(params, new_rest)
        losses.append((float(loss), float(loss2)))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
