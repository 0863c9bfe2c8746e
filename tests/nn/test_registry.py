"""Layer registry: every public layer of ``refax.nn`` under eager, jit, grad, split/merge, clone.

``REGISTRY`` maps each public Module class exported by ``refax.nn`` to a constructor and an
input spec (tiny shapes, so the whole file runs in seconds). ``test_registry_is_complete``
fails when a public layer is added without an entry here. For each entry the same initial
model (an ``nnx.clone`` of one built layer, so every check starts from identical state) is
run eagerly and

* under ``nnx.jit``: same output and same updated state (running stats, RNG counters, weights
  normalized in place) as eager;
* under ``nnx.grad``: gradients w.r.t. its ``Param``s equal ``jax.grad`` of the same loss
  written functionally with ``nnx.split``/``nnx.merge``, and are finite;
* after a ``split``/``merge`` round trip and after ``nnx.clone``: same output and updated
  state, and the clone owns no Variable of the original.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import refax.nn as nn
from refax import nnx
from refax._module import Module
from refax._rngs import Rngs
from tests._oracle import assert_trees_close, pure


def _x(*shape: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape)


@dataclasses.dataclass(frozen=True)
class Entry:
    """How to build one layer and what to call it with.

    Attributes:
      make: builds the layer from an ``Rngs``.
      inputs: gives the positional call arguments for a built layer (cells need a carry).
    """

    make: Callable[[Rngs], Module]
    inputs: Callable[[Module], tuple[Any, ...]]


def _on(*shape: int) -> Callable[[Module], tuple[Any, ...]]:
    return lambda _: (_x(*shape),)


def _cell_inputs(m: Module) -> tuple[Any, ...]:
    return (m.initialize_carry((2, 3), Rngs(carry=2)), _x(2, 3))


REGISTRY: dict[str, Entry] = {
    "Linear": Entry(lambda r: nn.Linear(3, 4, rngs=r), _on(2, 3)),
    "LinearGeneral": Entry(
        lambda r: nn.LinearGeneral((2, 3), (2, 2), axis=(-2, -1), rngs=r), _on(2, 2, 3)
    ),
    "Einsum": Entry(lambda r: nn.Einsum("ab,bc->ac", (3, 4), (4,), rngs=r), _on(2, 3)),
    "Embed": Entry(lambda r: nn.Embed(5, 3, rngs=r), lambda _: (jnp.array([0, 4, 2]),)),
    "Conv": Entry(lambda r: nn.Conv(2, 3, (3,), rngs=r), _on(1, 5, 2)),
    "ConvTranspose": Entry(lambda r: nn.ConvTranspose(2, 3, (3,), rngs=r), _on(1, 5, 2)),
    "MultiHeadAttention": Entry(
        lambda r: nn.MultiHeadAttention(
            2, 4, 4, dropout_rate=0.5, deterministic=False, decode=False, rngs=r
        ),
        _on(1, 3, 4),
    ),
    "BatchNorm": Entry(lambda r: nn.BatchNorm(3, rngs=r), _on(4, 3)),
    "LayerNorm": Entry(lambda r: nn.LayerNorm(3, rngs=r), _on(2, 3)),
    "RMSNorm": Entry(lambda r: nn.RMSNorm(3, rngs=r), _on(2, 3)),
    "GroupNorm": Entry(lambda r: nn.GroupNorm(4, num_groups=2, rngs=r), _on(2, 4)),
    "InstanceNorm": Entry(lambda r: nn.InstanceNorm(3, rngs=r), _on(2, 4, 3)),
    "WeightNorm": Entry(lambda r: nn.WeightNorm(nn.Linear(3, 4, rngs=r), rngs=r), _on(2, 3)),
    "SpectralNorm": Entry(
        lambda r: nn.SpectralNorm(nn.Conv(2, 3, (2,), rngs=r), rngs=r), _on(1, 4, 2)
    ),
    "Dropout": Entry(lambda r: nn.Dropout(0.5, rngs=r), _on(8)),
    "LoRA": Entry(
        lambda r: nn.LoRA(3, 2, 4, b_initializer=nn.initializers.ones, rngs=r), _on(2, 3)
    ),
    "LoRALinear": Entry(lambda r: nn.LoRALinear(3, 4, lora_rank=2, rngs=r), _on(2, 3)),
    "LSTMCell": Entry(lambda r: nn.LSTMCell(3, 4, rngs=r), _cell_inputs),
    "OptimizedLSTMCell": Entry(lambda r: nn.OptimizedLSTMCell(3, 4, rngs=r), _cell_inputs),
    "GRUCell": Entry(lambda r: nn.GRUCell(3, 4, rngs=r), _cell_inputs),
    "SimpleCell": Entry(lambda r: nn.SimpleCell(3, 4, rngs=r), _cell_inputs),
    "RNN": Entry(lambda r: nn.RNN(nn.LSTMCell(3, 4, rngs=r)), _on(2, 5, 3)),
    "Bidirectional": Entry(
        lambda r: nn.Bidirectional(
            nn.RNN(nn.GRUCell(3, 4, rngs=r)), nn.RNN(nn.GRUCell(3, 4, rngs=r))
        ),
        _on(2, 5, 3),
    ),
    "PReLU": Entry(lambda r: nn.PReLU(0.2), _on(5)),
    "Sequential": Entry(
        lambda r: nn.Sequential(nn.Linear(3, 4, rngs=r), nn.gelu, nn.LayerNorm(4, rngs=r)),
        _on(2, 3),
    ),
}

# Public Module classes that are deliberately not registered, with the reason.
NOT_LAYERS = {
    "RNNCellBase": "abstract base of the cells; every concrete cell is registered",
}


def _public_modules() -> set[str]:
    return {
        name
        for name, value in vars(nn).items()
        if not name.startswith("_") and inspect.isclass(value) and issubclass(value, Module)
    }


def test_registry_is_complete():
    public = _public_modules()
    missing = sorted(public - REGISTRY.keys() - NOT_LAYERS.keys())
    assert not missing, (
        f"public refax.nn layers missing from tests/nn/test_registry.py REGISTRY: {missing}; "
        "add an Entry (constructor + inputs) for each."
    )
    stale = sorted((REGISTRY.keys() | NOT_LAYERS.keys()) - public)
    assert not stale, f"registry entries that are not public refax.nn Modules: {stale}"


# -- helpers ---------------------------------------------------------------------------------
def _build(name: str) -> tuple[Module, tuple[Any, ...]]:
    entry = REGISTRY[name]
    model = entry.make(Rngs(0, dropout=1, carry=2))
    return model, entry.inputs(model)


def _loss(out: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(out) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return sum(jnp.sum(jnp.square(x)) for x in leaves)


def _all_finite(tree: Any) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def _run(model: Module, inputs: tuple[Any, ...]) -> tuple[Any, dict]:
    """Output and whole updated state (as numpy) of one eager call."""
    out = model(*inputs)
    return out, pure(nnx, model)


def _assert_same(ref: tuple[Any, dict], got: tuple[Any, dict], rtol: float = 1e-5) -> None:
    (y_ref, s_ref), (y, s) = ref, got
    assert_trees_close(y_ref, y, rtol=rtol, atol=1e-6)
    assert_trees_close(s_ref, s, rtol=rtol, atol=1e-6)


@pytest.fixture(scope="module")
def reference():
    """Per layer: the built layer (never called) and its eager output + updated state."""
    cache: dict[str, tuple[Module, tuple, tuple]] = {}

    def get(name: str) -> tuple[Module, tuple, tuple]:
        if name not in cache:
            base, inputs = _build(name)
            cache[name] = (base, inputs, _run(nnx.clone(base), inputs))
        return cache[name]

    return get


NAMES = sorted(REGISTRY)


# -- checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_eager(name, reference):
    base, inputs, (out, state) = reference(name)
    assert jax.tree.leaves(out), "layer returned no arrays"
    assert _all_finite(out)
    assert _all_finite(state)


@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager(name, reference):
    base, inputs, ref = reference(name)
    model = nnx.clone(base)

    @nnx.jit
    def forward(m, *args):
        return m(*args)

    out = forward(model, *inputs)
    _assert_same(ref, (out, pure(nnx, model)))


@pytest.mark.parametrize("name", NAMES)
def test_grad_matches_functional(name, reference):
    base, inputs, _ = reference(name)

    def loss(m, *args):
        return _loss(m(*args))

    grads = nnx.grad(loss)(nnx.clone(base), *inputs)

    graphdef, params, rest = nnx.split(nnx.clone(base), nnx.Param, ...)

    def functional_loss(p, *args):  # a pure function: works on fresh copies of the state
        return loss(nnx.merge(graphdef, p, rest, copy=True), *args)

    expected = jax.grad(functional_loss)(params, *inputs)
    got, want = pure(nnx, grads), pure(nnx, expected)
    assert_trees_close(want, got, rtol=1e-5, atol=1e-5)
    assert _all_finite(got)
    has_params = bool(jax.tree.leaves(nnx.state(base, nnx.Param)))
    assert bool(jax.tree.leaves(got)) == has_params
    if has_params and name != "LoRA":  # LoRA's B starts at ones, A at random: nonzero too
        assert any(np.abs(g).sum() > 0 for g in jax.tree.leaves(got)), "all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_split_merge_round_trip(name, reference):
    base, inputs, ref = reference(name)
    graphdef, state = nnx.split(nnx.clone(base))
    model = nnx.merge(graphdef, state)
    assert type(model) is type(base)
    _assert_same(ref, _run(model, inputs), rtol=0)
    # the merged model is the same structure as the original
    assert nnx.graphdef(nnx.clone(base)) == graphdef


@pytest.mark.parametrize("name", NAMES)
def test_clone(name, reference):
    base, inputs, ref = reference(name)
    before = pure(nnx, base)
    copy = nnx.clone(base)
    own = {id(v) for _, v in nnx.to_flat_state(nnx.state(base, nnx.Variable))}
    assert not own & {id(v) for _, v in nnx.to_flat_state(nnx.state(copy, nnx.Variable))}
    _assert_same(ref, _run(copy, inputs), rtol=0)
    assert_trees_close(before, pure(nnx, base), rtol=0, atol=0)  # the original is untouched
